"""hardware-inventory's contract: its records (nodes, deployments, their replicas, memory-fit
estimates and corrections) and the RPC ops' bodies, what `strata nodes/fit/deployments` show.

The registry (services/hardware_inventory) keeps these records in its KV bucket and answers with them;
the rules that make them (placement, the fit formula, learning corrections) are its own code. What a
worker asks at start is in shared/assignments.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import DEFAULT_KEEP_ALIVE_S, DeviceInfo, EmbeddingPooling, ModelId, utcnow

DeviceKind = Literal["cpu", "cuda"]
Policy = Literal["binpack", "spread"]
NodeStatus = Literal["alive", "lost"]
ReplicaStatus = Literal["scheduled", "ready", "pending", "failed"]


class ModelShape(BaseModel):
    """The architecture figures the formula needs (from model-store's ModelMetadata)."""

    model_config = ConfigDict(frozen=True)
    architecture: str
    dtype: str = Field(description="the checkpoint's dtype")
    parameters: int = Field(ge=0)
    weight_bytes: int = Field(ge=0)
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    context_length: int = Field(ge=1, description="the model's maximum context (max_position_embeddings)")
    num_experts: int | None = Field(default=None, ge=1, description="MoE: experts per layer; None for a dense model")
    num_experts_per_tok: int | None = Field(default=None, ge=1, description="MoE: experts each token goes through")
    expert_intermediate_size: int | None = Field(default=None, ge=1, description="MoE: one expert's intermediate size")
    format: str | None = Field(default=None, description="'gguf': llama.cpp's fit (fit_gguf.py); None: safetensors")

    @property
    def moe(self) -> bool:
        return bool(self.num_experts and self.num_experts_per_tok)


class FitEstimate(BaseModel):
    """A prediction, term by term, so that a person can check it by hand."""

    model_config = ConfigDict(frozen=True)
    device_kind: DeviceKind
    dtype: str = Field(description="the dtype the device computes in")
    quantize: str | None = Field(default=None, description="weight-only quantization of the linear layers (int8, int4)")
    context_length: int
    batch: int
    weights: int
    kv_cache: int
    kv_bytes_per_token: int
    activations: int
    workspace: int
    runtime_overhead: int

    @property
    def total(self) -> int:
        """Bytes the deployment allocates on the device: compared with the measured peak."""
        return self.weights + self.kv_cache + self.activations + self.workspace

    @property
    def booked(self) -> int:
        """What a booking reserves: the total plus the per-process runtime overhead."""
        return self.total + self.runtime_overhead


def correction_key(architecture: str, dtype: str, device_kind: str) -> str:
    """A KV-safe key: ``LlamaForCausalLM.bfloat16.cuda``."""
    clean = lambda s: "".join(c if c.isalnum() or c in "-_" else "_" for c in s)  # noqa: E731
    return f"{clean(architecture)}.{clean(dtype)}.{clean(device_kind)}"


class Correction(BaseModel):
    """How far the fit formula is off for an architecture, dtype and device kind, learnt from measurements
    (the registry's domain/correction.py learns and applies it)."""

    model_config = ConfigDict(frozen=True)
    architecture: str
    dtype: str
    device_kind: str
    samples: int = Field(default=0, ge=0)
    weights_factor: float = 1.0
    overhead_factor: float = 1.0
    last_raw_error: float | None = Field(default=None, description="(formula - measured) / measured, last sample")
    last_error: float | None = Field(default=None, description="(prediction used at scheduling - measured) / measured")
    mean_abs_error: float | None = Field(default=None, description="mean |last_error| over every sample")
    ignored: int = Field(default=0, ge=0, description="measurements not learned from (too small, too far off)")
    last_ignored: str | None = Field(default=None, description="why the last ignored measurement was")
    applied: list[str] = Field(
        default=[], description="deployment replicas already counted, learned or ignored (idempotence)"
    )

    @property
    def key(self) -> str:
        return correction_key(self.architecture, self.dtype, self.device_kind)


class NodeRecord(BaseModel):
    node_id: str
    hostname: str
    cpu_model: str
    cpu_cores: int
    ram_total: int
    disk_total: int = 0
    disk_free: int = 0
    devices: list[DeviceInfo] = Field(description="every device a model can be placed on, the CPU ('cpu') included")
    labels: dict[str, str] = {}
    heartbeat_interval_s: float = 5.0
    status: NodeStatus = "alive"
    registered_at: datetime = Field(default_factory=utcnow)
    status_since: datetime = Field(default_factory=utcnow)

    def device(self, device_id: str) -> DeviceInfo | None:
        return next((d for d in self.devices if d.id == device_id), None)


class Replica(BaseModel):
    index: int = Field(ge=0)
    status: ReplicaStatus = "scheduled"
    node_id: str | None = None
    device: str | None = None
    device_kind: str | None = None
    dtype: str | None = None
    predicted_bytes: int = Field(default=0, description="corrected prediction of the device peak")
    booked_bytes: int = Field(default=0, description="held on the device: prediction + runtime overhead")
    kv_cache_bytes: int = 0
    generation: int = Field(default=0, description="how many times this replica was placed")
    measured_peak: int | None = None
    runtime: str | None = Field(
        default=None, description="what serves it (deploy.ready's runtime): strata-engine or llama.cpp"
    )
    loaded: bool | None = Field(
        default=None,
        description="on-demand: whether its weights are in memory now "
        "(deploy.model_loaded / model_unloaded); None: not on-demand, or not heard yet",
    )

    @property
    def holds_memory(self) -> bool:
        return self.status in ("scheduled", "ready") and self.node_id is not None


class Deployment(BaseModel):
    deployment_id: str
    model_ref: str
    model: ModelId
    shape: ModelShape
    context_length: int
    batch: int = 1
    dtype: str | None = None
    quantize: str | None = Field(
        default=None, description="weight-only quantization asked for (int8, int4); None: none"
    )
    constraints: dict[str, str] = {}
    embedding_pooling: EmbeddingPooling | None = None
    policy: Policy = "binpack"
    policy_exclusions: dict[str, str] = Field(
        default={}, description="admission policy: label selector -> why this model is kept off its nodes"
    )
    replicas: list[Replica]
    on_demand: bool = Field(
        default=False, description="loaded by requests on its worker; its replicas book no memory here"
    )
    keep_alive_s: float = Field(
        default=DEFAULT_KEEP_ALIVE_S, ge=0, description="on-demand: idle seconds before unloading"
    )
    created: datetime = Field(default_factory=utcnow)
    last_used: datetime = Field(default_factory=utcnow)

    @property
    def state(self) -> str:
        statuses = {r.status for r in self.replicas}
        if statuses == {"ready"}:
            return "ready"
        return "degraded" if statuses & {"pending", "failed"} else "scheduled"


class NodeView(BaseModel):
    node: NodeRecord
    ram_free: int | None = Field(default=None, description="from the latest heartbeat")
    utilisation: dict[str, float] = {}
    loaded_models: list[str] = []
    seconds_since_heartbeat: float | None = None
    booked: dict[str, int] = Field(default={}, description="device id -> bytes booked by deployments")
    available: dict[str, int] = Field(default={}, description="device id -> bytes a new deployment may book")


class NodeList(BaseModel):
    nodes: list[NodeView]


class EstimateView(BaseModel):
    raw: FitEstimate = Field(description="the formula alone")
    corrected: FitEstimate = Field(description="scaled by what measurements taught")
    raw_total: int
    total: int = Field(description="corrected prediction of the device peak")
    booked: int = Field(description="what a booking reserves: total plus runtime overhead")
    correction: Correction | None = Field(
        default=None, description="the correction applied, if any measurement taught one"
    )
    correction_note: str = Field(default="", description="why the estimate is (not) corrected, in words")


class FitRow(BaseModel):
    node_id: str
    device: str
    kind: str
    name: str
    node_status: str
    need: int
    available: int
    capacity: int
    fits: bool
    reason: str


class FitRequest(BaseModel):
    model_ref: str = Field(min_length=1)
    context_length: int | None = Field(default=None, ge=1)
    batch: int = Field(default=1, ge=1, le=4096)
    dtype: str | None = None
    quantize: str | None = None
    constraints: dict[str, str] = {}


class FitReport(BaseModel):
    model_ref: str
    model: ModelId
    architecture: str
    refused: str | None = Field(
        default=None,
        description="why no device can serve it, whatever its memory (an architecture no "
        "runtime serves, naming those supported); then there are no estimates or rows",
    )
    context_length: int | None = None
    batch: int
    estimates: dict[str, EstimateView] = Field(description="per device kind")
    rows: list[FitRow]


class DeployRequest(BaseModel):
    model_ref: str = Field(min_length=1)
    replicas: int = Field(default=1, ge=1, le=64)
    constraints: dict[str, str] = {}
    context_length: int | None = Field(default=None, ge=1)
    batch: int = Field(default=1, ge=1, le=4096)
    policy: Policy | None = None
    dtype: str | None = None
    quantize: str | None = Field(
        default=None, description="weight-only quantization of the linear layers: int8 or int4"
    )
    deployment_id: str | None = None
    embedding_pooling: EmbeddingPooling | None = None
    on_demand: bool = False
    keep_alive_s: float | None = Field(default=None, ge=0)


class DeployOutcome(BaseModel):
    deployment_id: str
    model_ref: str
    scheduled: bool
    reason: str | None = None
    code: str | None = Field(
        default=None,
        description="why not: invalid, not_found, unavailable, unsupported (no runtime serves its "
        "architecture), no_fit or forbidden (the admission policy)",
    )
    deployment: Deployment | None = None


class DeploymentList(BaseModel):
    deployments: list[Deployment]


class UndeployRequest(BaseModel):
    model_ref: str | None = None
    deployment_id: str | None = None


class UndeployOutcome(BaseModel):
    released: list[str] = Field(description="deployment ids undeployed")


class CorrectionList(BaseModel):
    corrections: list[Correction]


class Empty(BaseModel):
    pass
