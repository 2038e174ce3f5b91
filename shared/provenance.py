"""The provenance ledger's contract: signed tree heads, receipts, proofs and the RPC ops' bodies.

The ledger (services/provenance_ledger) serves these over ``rpc.provenance-ledger.<op>`` and its HTTP
API; the CLI and any other client read them. What it does with them (signing heads, building proofs,
verifying a receipt offline) is the ledger's own code: ``services.provenance_ledger.api`` for in-process use.

A signed tree head's bytes are a fixed, versioned text so any tool can rebuild them:
``strata.ledger.sth.v1\\n<key id>\\n<tree size>\\n<root hash hex>\\n<timestamp ms>\\n``. The key id is
``short_key_id`` (shared/signing_keys.py): the first 16 bytes (hex) of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STH_FORMAT = "strata.ledger.sth.v1"
RECEIPT_FORMAT = "strata.ledger.receipt.v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def signed_bytes(key_id: str, tree_size: int, root_hash: str, timestamp_ms: int) -> bytes:
    return f"{STH_FORMAT}\n{key_id}\n{tree_size}\n{root_hash}\n{timestamp_ms}\n".encode()


def datetime_to_ms(when: datetime) -> int:
    return (when - _EPOCH) // _MS


def ms_to_datetime(ms: int) -> datetime:
    return _EPOCH + ms * _MS


class TreeHead(BaseModel):
    """A signed tree head, as kept, served, published and embedded in receipts."""

    model_config = ConfigDict(frozen=True)
    tree_size: int = Field(ge=0)
    root_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 Merkle root")
    timestamp_ms: int = Field(ge=0, description="when it was signed, ms since the Unix epoch")
    key_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    signature: str = Field(description="base64 Ed25519 signature over signed_bytes()")

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.key_id, self.tree_size, self.root_hash, self.timestamp_ms)

    @property
    def signed_at(self) -> datetime:
        return ms_to_datetime(self.timestamp_ms)


class Receipt(BaseModel):
    """An inference receipt: the event, its leaf, the inclusion proof and a signed head that covers it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal["strata.ledger.receipt.v1"] = RECEIPT_FORMAT
    event: dict[str, Any] = Field(description="the inference.completed event envelope, as published")
    leaf_index: int = Field(ge=0)
    conflict_of: int | None = Field(default=None, ge=0, description="set when this event reused the id of the event at "
                                    "that earlier leaf with other content: the mark is part of the hashed leaf")
    inclusion_proof: list[str] = Field(description="hex node hashes, RFC 9162 order")
    tree_head: TreeHead


ProblemKind = Literal["changed", "missing", "reordered", "malformed", "root_mismatch", "truncated", "bad_signature"]


class Problem(BaseModel):
    index: int
    kind: ProblemKind
    detail: str


class VerifyReport(BaseModel):
    ok: bool
    leaves: int
    heads_checked: int
    latest_signed_size: int | None
    problems: list[Problem]
    problems_total: int


class Empty(BaseModel):
    pass


class HeadResponse(BaseModel):
    tree_size: int = Field(description="leaves committed now (the latest head may be older)")
    root_hash: str = Field(description="root over all committed leaves")
    signed: TreeHead | None = Field(description="the latest signed tree head")


class InclusionRequest(BaseModel):
    index: int | None = Field(default=None, ge=0)
    event_id: str | None = None
    tree_size: int | None = Field(default=None, ge=1, description="default: the latest signed head covering the leaf")

    @model_validator(mode="after")
    def _one_of(self) -> InclusionRequest:
        if (self.index is None) == (self.event_id is None):
            raise ValueError("give exactly one of index or event_id")
        return self


class InclusionProof(BaseModel):
    leaf_index: int
    tree_size: int
    leaf_hash: str
    root_hash: str
    proof: list[str]
    tree_head: TreeHead | None = Field(description="the signed head of this size, when the size is a signed one")


class ConsistencyRequest(BaseModel):
    first: int = Field(ge=0)
    second: int | None = Field(default=None, ge=0, description="default: the current size")


class ConsistencyProof(BaseModel):
    first: int
    second: int
    first_root: str
    second_root: str
    proof: list[str]


class RequestRef(BaseModel):
    request_id: str = Field(min_length=1)


class ModelLineageRef(BaseModel):
    ref: str = Field(min_length=1, description="NAME, NAME:VERSION, NAME@ALIAS or a manifest digest")


class DatasetRef(BaseModel):
    digest: str = Field(min_length=1)


class AuditRequest(BaseModel):
    since: str | None = Field(default=None, description="ISO time or an age like 15m, 2h, 7d")
    model: str | None = Field(default=None, description="NAME, NAME:VERSION, NAME@ALIAS or a manifest digest")
    type: str | None = None
    limit: int = Field(default=1000, ge=1, le=100_000)


class AuditEntry(BaseModel):
    leaf_index: int
    event_id: str
    type: str
    time: str
    source: str
    data: dict[str, Any]


class ExportRequest(BaseModel):
    ref: str = Field(min_length=1)
    format: Literal["in-toto", "cyclonedx"] = "in-toto"


class PublicKey(BaseModel):
    pem: str
    key_id: str


class LedgerStats(BaseModel):
    tree_size: int
    appended: int
    duplicates: int
    conflicts: int = Field(
        description="leaves that reuse an earlier event's id with other content (marked conflict_of), "
        "counted in the file"
    )
    batches: int
    dead_lettered: int
    ingest_running: bool
    ingest_failures: int
    last_error: str | None
    tamper_suspected: bool
    verified_size: int | None = Field(
        description="leaves re-hashed and matching at the last clean verify (None: none yet)"
    )
    verified_at: datetime | None = Field(description="when that verify ran")
    full_verify_at: datetime | None = Field(description="the last verify that re-hashed every leaf")
