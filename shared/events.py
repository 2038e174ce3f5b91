"""Every event Strata publishes: the versioned envelope and the typed payload of each event type.

This is the one definition of the event contracts. An event of type ``model.registered`` travels
on the subject ``evt.model.registered`` and is kept in the JetStream stream ``EVENTS``. Live telemetry
(heartbeats) travels on ``live.<type>`` through core NATS only: it is not history worth keeping, and
the ledger would otherwise log a heartbeat from every node every few seconds.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import subjects
from shared.model_source import ModelSource


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class EventData(BaseModel):
    """Base of every payload. A subclass names its event ``TYPE`` and schema ``VERSION``."""

    # Unknown fields are ignored so that an older consumer still reads a newer producer's event.
    model_config = ConfigDict(extra="ignore", frozen=True)

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    PERSISTENT: ClassVar[bool] = True
    PUBLISHER: ClassVar[str]  # the one service allowed to publish it, or "client" (CLI, users)
    registry: ClassVar[dict[str, type[EventData]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            if cls.TYPE in EventData.registry:
                raise TypeError(f"event type {cls.TYPE!r} is defined twice")
            EventData.registry[cls.TYPE] = cls

    @classmethod
    def subject(cls) -> str:
        return subjects.event(cls.TYPE, persistent=cls.PERSISTENT)


EmbeddingPooling = Literal["last", "mean"]  # services/inference_worker/engine/embedding.py
DEFAULT_KEEP_ALIVE_S = 300.0  # an on-demand deployment's idle time before unloading, unless its deploy says


class Source(BaseModel):
    model_config = ConfigDict(frozen=True)
    service: str
    node: str


D = TypeVar("D", bound=EventData)


class Event(BaseModel, Generic[D]):
    """The envelope. ``id`` also travels as ``Nats-Msg-Id`` so JetStream stores it once."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    type: str
    source: Source
    time: datetime = Field(default_factory=utcnow)
    version: int = Field(ge=1)
    data: D

    @property
    def subject(self) -> str:
        data_cls = EventData.registry.get(self.type)
        return subjects.event(self.type, persistent=data_cls.PERSISTENT if data_cls else True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def make_event(data: D, source: Source, *, event_id: str | None = None) -> Event[D]:
    return Event[type(data)](  # type: ignore[misc]
        id=event_id or new_id(), type=data.TYPE, source=source, version=data.VERSION, data=data
    )


class MalformedEvent(ValueError):
    """Bytes that are not a valid event. The message says exactly why, for the dead-letter record."""


class _RawEnvelope(Event[Any]):
    data: dict[str, Any]


def parse_event(raw: bytes, subject: str | None = None) -> Event[EventData]:
    """Parse and validate an event, checking that it arrived on its own subject."""
    try:
        envelope = _RawEnvelope.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedEvent(f"invalid envelope: {_errors(exc)}") from None
    data_cls = EventData.registry.get(envelope.type)
    if data_cls is None:
        raise MalformedEvent(f"unknown event type {envelope.type!r}")
    if envelope.version > data_cls.VERSION:
        raise MalformedEvent(
            f"{envelope.type} schema version {envelope.version} is newer than this service "
            f"understands ({data_cls.VERSION})"
        )
    if subject is not None and subject != envelope.subject:
        raise MalformedEvent(f"event of type {envelope.type!r} arrived on subject {subject!r}")
    try:
        data = data_cls.model_validate(envelope.data)
    except ValidationError as exc:
        raise MalformedEvent(f"invalid {envelope.type} data: {_errors(exc)}") from None
    # Every field is validated by now: build the typed envelope without validating it a third time.
    fields = {name: getattr(envelope, name) for name in ("id", "type", "source", "time", "version")}
    return Event[data_cls].model_construct(**fields, data=data)  # type: ignore[valid-type]


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
    )


class DeadLetter(BaseModel):
    """What a consumer could not process, kept in the ``DEADLETTER`` stream with the reason."""

    service: str
    consumer: str
    subject: str
    reason: str
    deliveries: int
    event_id: str | None = None
    payload: str = Field(description="the original bytes (the first 64 KiB), decoded as UTF-8 with replacement")
    payload_bytes: int = Field(default=0, ge=0, description="the size of the original message")
    truncated: bool = False
    headers: dict[str, str] = {}
    time: datetime = Field(default_factory=utcnow)


# Payloads: shared value types first, then one class per event type under a base class per
# publisher. The publisher is checked on publish and is what infra/'s NATS permissions enforce.

DeviceKind = Literal["cpu", "cuda"]


class DeviceInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str = Field(description="e.g. 'cpu' or 'cuda:0'")
    kind: DeviceKind
    name: str
    memory_total: int = Field(ge=0, description="bytes")
    memory_free: int = Field(ge=0, description="bytes")
    uuid: str | None = None
    compute_capability: str | None = None
    driver: str | None = None


class ModelId(BaseModel):
    """A resolved model version. The manifest digest is its identity."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: int = Field(ge=1)
    digest: str


class InventoryEvent(EventData):
    PUBLISHER = "hardware-inventory"


class NodeRegistered(InventoryEvent):
    TYPE = "node.registered"
    node_id: str
    hostname: str
    cpu_model: str
    cpu_cores: int = Field(ge=1)
    ram_total: int = Field(ge=0)
    devices: list[DeviceInfo] = Field(
        default=[], description="placement targets: the CPU ('cpu', its RAM) and each GPU"
    )
    labels: dict[str, str] = {}
    disk_total: int = Field(default=0, ge=0, description="bytes on the data dir's file system")
    disk_free: int = Field(default=0, ge=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)


class NodeHeartbeat(InventoryEvent):
    TYPE = "node.heartbeat"
    PERSISTENT = False
    node_id: str
    ram_free: int = Field(ge=0)
    devices: list[DeviceInfo] = []
    utilisation: dict[str, float] = {}
    loaded_models: list[str] = []


class NodeLost(InventoryEvent):
    TYPE = "node.lost"
    node_id: str
    last_seen: datetime
    missed_beats: int = Field(ge=1)


class NodeReturned(InventoryEvent):
    TYPE = "node.returned"
    node_id: str


class DeployScheduled(InventoryEvent):
    TYPE = "deploy.scheduled"
    deployment_id: str
    model: ModelId
    node_id: str
    device: str
    predicted_bytes: int = Field(ge=0)
    context_length: int = Field(ge=1)
    model_ref: str = ""
    replica: int = Field(default=0, ge=0)
    replicas: int = Field(default=1, ge=1)
    generation: int = Field(default=0, ge=0, description="bumped each time the replica is placed again")
    dtype: str | None = Field(
        default=None,
        description="the dtype to compute in; None: the worker's default "
        "(on CPU its fastest 16-bit dtype for a 16-bit checkpoint)",
    )
    quantize: str | None = Field(
        default=None, description="weight-only quantization of the linear layers (int8, int4); None: none"
    )
    batch: int = Field(default=1, ge=1)
    kv_cache_bytes: int = Field(default=0, ge=0, description="size the KV cache to this (what was booked)")
    booked_bytes: int = Field(default=0, ge=0, description="predicted_bytes plus the runtime overhead")
    embedding_pooling: EmbeddingPooling | None = Field(default=None, description="as DeployRequested's")
    on_demand: bool = Field(default=False, description="as DeployRequested's: loaded by its first request, not now")
    keep_alive_s: float = Field(
        default=DEFAULT_KEEP_ALIVE_S, ge=0, description="on-demand: idle seconds before it is unloaded"
    )


class DeployRejected(InventoryEvent):
    TYPE = "deploy.rejected"
    deployment_id: str
    model_ref: str
    reason: str
    replica: int | None = Field(
        default=None, description="set when one replica of a placed deployment could not be placed again"
    )


class PolicyRuleResult(BaseModel):
    rule: str = Field(description="e.g. require_signature, allowed_licenses, node_labels[tier=edge]")
    passed: bool
    reason: str


class PolicyDecided(InventoryEvent):
    """The admission policy's verdict on one deploy request, published before deploy.scheduled/rejected."""

    TYPE = "policy.decided"
    deployment_id: str
    model: ModelId
    model_ref: str
    admitted: bool
    rules: list[PolicyRuleResult]
    policy_digest: str = Field(description="sha256:<hex> of the policy file's bytes: which policy decided")


class DeployReleased(InventoryEvent):
    """A replica's memory is no longer booked on a node (undeployed, moved after a node loss, evicted):
    the worker there unloads it if it still holds it."""

    TYPE = "deploy.released"
    deployment_id: str
    model: ModelId
    node_id: str
    device: str
    replica: int = Field(default=0, ge=0)
    reason: str


class ClientEvent(EventData):
    PUBLISHER = "client"


class DeployRequested(ClientEvent):
    TYPE = "deploy.requested"
    deployment_id: str = Field(default_factory=new_id)
    model_ref: str = Field(min_length=1, description="NAME, NAME:VERSION or NAME@ALIAS")
    replicas: int = Field(default=1, ge=1, le=64)
    constraints: dict[str, str] = {}
    context_length: int | None = Field(default=None, ge=1)
    batch: int = Field(default=1, ge=1, le=4096, description="sequences served at full context at once")
    policy: Literal["binpack", "spread"] | None = Field(default=None, description="None: the registry's default")
    dtype: str | None = Field(
        default=None,
        description="compute dtype; None: the checkpoint's if 16-bit (on CPU the "
        "node's fastest 16-bit dtype), else bf16 on GPU and float32 on CPU",
    )
    quantize: str | None = Field(
        default=None, description="weight-only quantization of the linear layers: int8 or int4; None: none"
    )
    embedding_pooling: EmbeddingPooling | None = Field(
        default=None,
        description=(
            "how /v1/embeddings pools the hidden states; "
            "None: as the checkpoint's sentence-transformers config says, else last token"
        ),
    )
    on_demand: bool = Field(
        default=False,
        description="not loaded at deploy: the first request loads it, an idle "
        "keep-alive unloads it, and it is evicted (least recently used) when memory is needed",
    )
    keep_alive_s: float | None = Field(
        default=None, ge=0, description="on-demand: idle seconds before unloading; None: DEFAULT_KEEP_ALIVE_S"
    )


class UndeployRequested(ClientEvent):
    TYPE = "deploy.undeploy_requested"
    model_ref: str = Field(min_length=1)
    deployment_id: str | None = None


class WorkerEvent(EventData):
    PUBLISHER = "inference-worker"


class DeployLoading(WorkerEvent):
    TYPE = "deploy.loading"
    deployment_id: str
    model: ModelId
    node_id: str
    device: str


class MeasuredMemory(BaseModel):
    model_config = ConfigDict(frozen=True)
    weights: int = Field(ge=0)
    kv_cache: int = Field(ge=0)
    peak: int = Field(ge=0)


class DeployReady(WorkerEvent):
    TYPE = "deploy.ready"
    deployment_id: str
    model: ModelId
    node_id: str
    device: str
    measured: MeasuredMemory
    load_seconds: float = Field(ge=0)
    dtype: str | None = Field(default=None, description="the dtype the engine computes in (which weights answered)")
    quantize: str | None = Field(default=None, description="weight-only quantization of the served weights; None: none")
    runtime: str | None = Field(
        default=None, description="what serves it: strata-engine or llama.cpp (None from a worker before #17)"
    )
    compiled_decode: bool = Field(
        default=False, description="decode steps run compiled (torch.compile): the same weights, other kernels"
    )
    on_demand: bool = Field(
        default=False, description="serving but not loaded: measured and load_seconds are 0 until deploy.model_loaded"
    )


class DeployFailed(WorkerEvent):
    TYPE = "deploy.failed"
    deployment_id: str
    model: ModelId | None = None
    node_id: str
    reason: str


class DeployUnloaded(WorkerEvent):
    TYPE = "deploy.unloaded"
    deployment_id: str
    model: ModelId
    node_id: str


UnloadReason = Literal["idle", "evicted"]  # undeploy and shutdown say deploy.unloaded, as for any deployment


class OnDemandEvent(WorkerEvent):
    """What every on-demand load and unload event names: the replica it happened to."""

    deployment_id: str
    replica: int = Field(default=0, ge=0)
    model: ModelId
    node_id: str


class ModelLoaded(OnDemandEvent):
    """An on-demand deployment was loaded (by a request); its deployment stays deployed when unloaded."""

    TYPE = "deploy.model_loaded"
    device: str
    measured: MeasuredMemory
    load_seconds: float = Field(ge=0)
    runtime: str | None = None
    request_id: str | None = Field(default=None, description="the request whose arrival loaded it")
    evicted: list[str] = Field(default=[], description="deployment ids unloaded to make room for it")


class ModelUnloaded(OnDemandEvent):
    """An on-demand deployment's model left memory; the next request loads it again."""

    TYPE = "deploy.model_unloaded"
    device: str
    reason: UnloadReason
    idle_seconds: float = Field(default=0.0, ge=0)
    freed_bytes: int = Field(default=0, ge=0, description="its footprint (measured peak)")
    unload_seconds: float = Field(default=0.0, ge=0)
    for_deployment: str | None = Field(default=None, description="evicted: the deployment that needed the memory")


class ModelLoadFailed(OnDemandEvent):
    """Loading an on-demand deployment failed, or found no room (busy models hold it); nothing of it
    stays in memory. A load past the worker's time-out is not a failure: it goes on."""

    TYPE = "deploy.model_load_failed"
    reason: str
    request_id: str | None = None


class ServedRequest(WorkerEvent):
    """What every served request's event says first: which request, and which model, deployment and device served it."""

    request_id: str
    trace_id: str | None = None
    model: ModelId
    deployment_id: str
    node_id: str
    device: str


class InferenceCompleted(ServedRequest):
    TYPE = "inference.completed"
    VERSION = 2  # 2 (#19): prompt_commitment, salted, replaces version 1's bare prompt_sha256
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    queue_seconds: float = Field(ge=0)
    time_to_first_token_seconds: float = Field(ge=0)
    time_per_output_token_seconds: float = Field(ge=0)
    e2e_seconds: float = Field(ge=0)
    finish_reason: str
    prompt_commitment: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="HMAC-SHA256 of the prompt keyed by a per-request salt that only the requester gets "
        "(shared/prompt_commitment.py); None only in version-1 events, which carried a bare prompt_sha256",
    )
    output_sha256: str
    api_key_id: str | None = Field(
        default=None, max_length=64, description="the public id of the API key that asked (token quotas)"
    )
    client_request_id: str | None = Field(
        default=None,
        max_length=128,
        description="the caller's own id (x-request-id at the gateway): correlation only, not unique",
    )
    runtime: str | None = Field(
        default=None, description="what ran it: strata-engine or llama.cpp (None from a worker before #17)"
    )


class EmbeddingsCompleted(ServedRequest):
    """The receipt of one embeddings request (#18): which model embedded how many inputs, committed to
    the inputs as ``inference.completed`` commits to a prompt (the salt goes to the requester alone),
    and the sha256 of the vectors returned (shared/embeddings.py says over which bytes)."""

    TYPE = "inference.embedded"
    inputs: int = Field(ge=1)
    prompt_tokens: int = Field(ge=0)
    dimensions: int = Field(ge=1)
    pooling: str
    e2e_seconds: float = Field(ge=0)
    prompt_commitment: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "HMAC-SHA256, keyed by the requester's salt, of the inputs as one JSON array "
            "(shared/embeddings.input_bytes)"
        ),
    )
    output_sha256: str = Field(
        description="sha256 of the returned vectors' float32 little-endian bytes, in input order"
    )
    api_key_id: str | None = Field(default=None, max_length=64)
    client_request_id: str | None = Field(default=None, max_length=128)


class InferenceFailed(WorkerEvent):
    TYPE = "inference.failed"
    request_id: str
    trace_id: str | None = None
    model_ref: str
    node_id: str | None = None
    reason: str
    e2e_seconds: float = Field(default=0, ge=0)


class ModelStoreEvent(EventData):
    PUBLISHER = "model-store"


class DatasetRegistered(ModelStoreEvent):
    TYPE = "dataset.registered"
    name: str
    digest: str
    files: dict[str, str] = Field(description="path -> sha256")
    source: str | None = None
    license: str | None = None


class ModelRegistered(ModelStoreEvent):
    TYPE = "model.registered"
    model: ModelId
    architecture: str
    parameters: int = Field(ge=0)
    datasets: list[str] = Field(default=[], description="dataset digests (lineage)")
    training_record: str | None = Field(default=None, description="digest of the training record")
    license: str | None = None
    source: ModelSource | None = Field(default=None, description="lineage of an import or a conversion (derived_from)")


class ModelSigned(ModelStoreEvent):
    TYPE = "model.signed"
    model: ModelId
    key_id: str


class ModelAliased(ModelStoreEvent):
    TYPE = "model.aliased"
    model: ModelId
    alias: str
    previous_version: int | None = None


class ModelDeleted(ModelStoreEvent):
    TYPE = "model.deleted"
    model: ModelId


class LedgerEvent(EventData):
    PUBLISHER = "provenance-ledger"


class LedgerCheckpoint(LedgerEvent):
    TYPE = "ledger.checkpoint"
    tree_size: int = Field(ge=0)
    root_hash: str
    signature: str
    key_id: str
    signed_at: datetime


class TamperDetected(LedgerEvent):
    TYPE = "ledger.tamper_detected"
    index: int = Field(ge=0)
    reason: str


class MonitorEvent(EventData):
    PUBLISHER = "monitor"


class AlertFiring(MonitorEvent):
    TYPE = "alert.firing"
    rule: str
    severity: Literal["info", "warning", "critical"]
    summary: str
    labels: dict[str, str] = {}
    value: float | None = None


class AlertResolved(MonitorEvent):
    TYPE = "alert.resolved"
    rule: str
    labels: dict[str, str] = {}
