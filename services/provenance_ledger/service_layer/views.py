"""Request and response bodies of the ledger's HTTP API and NATS RPC."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from services.provenance_ledger.domain.tree_head import TreeHead


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
