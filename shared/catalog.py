"""The model-store contract: manifests, their digests, references and the read RPCs' bodies.

Other services (hardware-inventory, inference-worker, the ledger) code against these names. A model
version is a ``ModelManifest``; its identity is ``manifest_digest(manifest)``, a sha256 over the
manifest's canonical JSON. Blobs are named by their sha256 in the Object Store bucket ``BLOB_BUCKET``;
the catalog (names, versions, aliases, manifests, signatures) lives in the KV bucket ``CATALOG_BUCKET``.

RPC subjects (``rpc.model-store.<op>``), each a ``shared.rpc`` typed call:

- ``resolve``     ResolveRequest -> ResolvedModel   (NotFound for an unknown name/version/alias, Invalid for a
                  malformed ref)
- ``list``        ListRequest -> ModelList
- ``datasets``    ListRequest -> DatasetList
- ``dataset``     DatasetRequest -> ResolvedDataset (by digest or name)
- ``public_key``  PublicKeyRequest -> PublicKey

Worker side: ``shared.model_fetch.fetch_model(nc, ref_or_resolved, cache_dir, *, public_key=None)
-> LocalModel(path, resolved)`` pulls the blobs into ``cache_dir/blobs/<sha256>``, materialises the
checkpoint directory, and verifies every digest and the signature before it returns
(``VerificationError`` names the file otherwise).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from shared import subjects
from shared.canonical import canonical_json  # model-store's callers import it from here, too
from shared.errors import Invalid
from shared.events import ModelId, utcnow
from shared.model_source import ModelSource

SERVICE = "model-store"
BLOB_BUCKET, CATALOG_BUCKET = subjects.BLOB_BUCKET, subjects.CATALOG_BUCKET

# In-toto / DSSE shapes, the ones OpenSSF model-signing uses.
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://strata.dev/model-manifest/v1"
DATASET_PREDICATE_TYPE = "https://strata.dev/dataset-manifest/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ALIAS_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
_REF = re.compile(rf"^(?P<name>{NAME_PATTERN})(?::(?P<version>[0-9]{{1,9}})|@(?P<alias>{ALIAS_PATTERN}))?$")
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelMetadata(_Frozen):
    """What the checkpoint says about itself: read from config.json and the safetensors headers."""

    architecture: str = Field(description="config.json architectures[0], e.g. LlamaForCausalLM")
    model_type: str | None = Field(default=None, description="config.json model_type, e.g. llama")
    parameters: int = Field(ge=0, description="elements over every tensor in the safetensors files")
    dtype: str = Field(description="the dominant tensor dtype by bytes, e.g. BF16")
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    context_length: int | None = Field(default=None, description="max_position_embeddings")
    weight_bytes: int = Field(ge=0, description="bytes of tensor data over every safetensors file")
    tie_word_embeddings: bool = False
    # added later (see _ADDED): a manifest from before them has none of these keys
    runtime: str | None = Field(
        default=None,
        description=(
            "what serves it (shared/architectures.py), decided at push: null when nothing did then, "
            "or in a manifest from before this field; readers then check the architecture"
        ),
    )
    num_experts: int | None = Field(
        default=None, description="MoE: experts per layer (num_local_experts or num_experts)"
    )
    num_experts_per_tok: int | None = Field(default=None, description="MoE: experts each token is routed to")
    moe_intermediate_size: int | None = Field(
        default=None,
        description="MoE: one expert's intermediate size where it is not "
        "intermediate_size (Qwen3-MoE; Mixtral's experts use intermediate_size)",
    )
    # GGUF (llama.cpp's format): read from the file's header at push; unset for safetensors checkpoints
    format: str | None = Field(default=None, description="the weights' file format: 'gguf'; unset means safetensors")
    quantization: str | None = Field(default=None, description="GGUF general.file_type, e.g. F16, Q8_0, Q4_K_M")
    bytes_by_type: dict[str, int] | None = Field(
        default=None, description="GGUF: tensor bytes by ggml type (F32, Q8_0, ...)"
    )
    chat_template: str | None = Field(default=None, description="GGUF: tokenizer.chat_template")

    @model_serializer(mode="wrap")
    def _as_made(self, handler: SerializerFunctionWrapHandler):  # unannotated, so the JSON schema stays the model's
        """A field added after manifests were first signed is left out while it was never set, so an older
        manifest dumps (and hashes, and verifies) byte for byte as it was signed."""
        data = handler(self)
        for name in _ADDED:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data


_ADDED = (
    "runtime",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "format",
    "quantization",
    "bytes_by_type",
    "chat_template",
)


class FileEntry(_Frozen):
    path: str = Field(description="relative POSIX path inside the checkpoint directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex digest; also the blob's name")
    size: int = Field(ge=0)


class ModelManifest(_Frozen):
    kind: Literal["model"] = "model"
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    version: int = Field(ge=1)
    files: list[FileEntry]
    metadata: ModelMetadata
    license: str | None = None
    datasets: list[str] = Field(default=[], description="lineage: digests of the datasets it was trained on")
    training_record: dict[str, Any] | None = None
    created: datetime = Field(default_factory=utcnow)
    source: ModelSource | None = Field(
        default=None, description="an import's or a conversion's origin (shared/model_source.py)"
    )

    @model_serializer(mode="wrap")
    def _without_no_source(self, handler: SerializerFunctionWrapHandler):  # unannotated: the schema stays the model's
        """``source`` was added after manifests were first signed: left out while unset, so a manifest
        without one dumps (and hashes, and verifies) byte for byte as before."""
        data = handler(self)
        if self.source is None:
            data.pop("source", None)
        return data


class DatasetManifest(_Frozen):
    kind: Literal["dataset"] = "dataset"
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    files: list[FileEntry]
    source: str | None = None
    license: str | None = None
    description: str | None = None
    created: datetime = Field(default_factory=utcnow)


def manifest_digest(manifest: ModelManifest | DatasetManifest | dict[str, Any]) -> str:
    """``sha256:<hex>`` over the manifest's canonical JSON: the model's (or dataset's) identity."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


class ModelRef(_Frozen):
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def parse_ref(ref: str) -> ModelRef:
    """``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS``; raises Invalid otherwise."""
    match = _REF.match(ref.strip()) if isinstance(ref, str) else None
    if match is None or (match["version"] is not None and int(match["version"]) < 1):
        raise Invalid(f"malformed model reference {ref!r}: expected NAME, NAME:VERSION (>= 1) or NAME@ALIAS")
    version = match["version"]
    return ModelRef(name=match["name"], version=int(version) if version else None, alias=match["alias"])


# -- RPC bodies ------------------------------------------------------------------------------


class ResolveRequest(BaseModel):
    ref: str = Field(min_length=1, description="NAME, NAME:VERSION or NAME@ALIAS")


class ResolvedModel(BaseModel):
    model: ModelId
    manifest: ModelManifest
    signature: dict[str, Any] = Field(description="DSSE envelope over an in-toto Statement of the manifest")
    aliases: list[str] = []


class ListRequest(BaseModel):
    name: str | None = Field(default=None, description="only this name's versions")


class ModelSummary(BaseModel):
    model: ModelId
    architecture: str
    parameters: int
    dtype: str
    weight_bytes: int
    size: int = Field(description="bytes over every file")
    license: str | None = None
    datasets: list[str] = []
    aliases: list[str] = []
    created: datetime


class ModelList(BaseModel):
    models: list[ModelSummary]


class DatasetRequest(BaseModel):
    ref: str = Field(min_length=1, description="a dataset digest (sha256:...) or a dataset name (latest registration)")


class ResolvedDataset(BaseModel):
    digest: str
    manifest: DatasetManifest
    signature: dict[str, Any]


class DatasetList(BaseModel):
    datasets: list[ResolvedDataset]


class PublicKeyRequest(BaseModel):
    pass


class PublicKey(BaseModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="sha256 hex of the raw public key")
    public_key: str = Field(description="raw 32-byte public key, base64")
    pem: str = Field(description="SubjectPublicKeyInfo PEM")


# -- push bodies (HTTP: blobs first with PUT /v1/blobs/{sha256}, then the listing) ------------


class PushModelRequest(BaseModel):
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    files: list[FileEntry] = Field(min_length=1)
    license: str | None = None
    datasets: list[str] = Field(default=[], description="dataset digests (sha256:...) it was trained on")
    training_record: dict[str, Any] | None = Field(
        default=None, description="defaults to the content of training_record.json when the files include one"
    )
    source: ModelSource | None = Field(
        default=None,
        description="an import's or a conversion's origin; a conversion's derived_from must be a version in this store",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source_fields_known(cls, value: Any) -> Any:
        """ModelSource keeps fields it does not know (a later version's); a push may not add any."""
        if isinstance(value, dict) and (unknown := sorted(set(value) - set(ModelSource.model_fields))):
            raise ValueError(f"unknown source field(s): {', '.join(unknown)}")
        if isinstance(value, ModelSource) and value.model_extra:
            raise ValueError(f"unknown source field(s): {', '.join(sorted(value.model_extra))}")
        return value


class PushedModel(ResolvedModel):
    created: bool = Field(description="false when an identical version already existed and was returned")
    warnings: list[str] = Field(
        default=[], description="stored, but e.g. no runtime serves its architecture: fit and deploy will refuse it"
    )


class PushDatasetRequest(BaseModel):
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    files: list[FileEntry] = Field(min_length=1)
    source: str | None = None
    license: str | None = None
    description: str | None = None


class PushedDataset(ResolvedDataset):
    created: bool


class AliasRequest(BaseModel):
    ref: str = Field(
        min_length=1, description="the version the alias should point at: NAME:VERSION, NAME@ALIAS or NAME"
    )
    alias: str = Field(pattern=f"^{ALIAS_PATTERN}$")


class AliasResult(BaseModel):
    model: ModelId
    alias: str
    previous_version: int | None = None


class DeleteResult(BaseModel):
    deleted: list[ModelId]
    blobs_removed: list[str] = Field(description="sha256 of blobs no other manifest used, garbage-collected")
