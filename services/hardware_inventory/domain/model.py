"""The registry's records: nodes, deployments and their replicas. Plain pydantic, stored as JSON in
the JetStream KV bucket (see adapters/state.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from services.hardware_inventory.domain.fit import ModelShape
from shared.events import DEFAULT_KEEP_ALIVE_S, DeviceInfo, EmbeddingPooling, ModelId, utcnow

Policy = Literal["binpack", "spread"]
NodeStatus = Literal["alive", "lost"]
ReplicaStatus = Literal["scheduled", "ready", "pending", "failed"]


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


class Telemetry(BaseModel):
    """The latest heartbeat of a node: live, kept in memory by each registry replica."""

    ram_free: int
    devices: dict[str, DeviceInfo] = {}
    utilisation: dict[str, float] = {}
    loaded_models: list[str] = []
    received_at: float = Field(description="monotonic seconds")


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


class Allocations(BaseModel):
    """Every deployment, in one document: one compare-and-set books several replicas atomically."""

    deployments: dict[str, Deployment] = {}

    def booked(self, node_id: str, device: str) -> int:
        return sum(  # on-demand replicas share what is left, their worker evicting the least recently used
            r.booked_bytes
            for d in self.deployments.values()
            for r in d.replicas
            if r.holds_memory and r.node_id == node_id and r.device == device and not d.on_demand
        )

    def pending_load(self, node_id: str, device: str) -> int:
        """Booked but not yet loaded: not yet visible in the node's live free memory."""
        return sum(
            r.booked_bytes
            for d in self.deployments.values()
            for r in d.replicas
            if r.status == "scheduled" and r.node_id == node_id and r.device == device and not d.on_demand
        )

    def by_ref(self, model_ref: str) -> list[Deployment]:
        return [d for d in self.deployments.values() if d.model_ref == model_ref or _same_model(d, model_ref)]


def _same_model(deployment: Deployment, ref: str) -> bool:
    return ref in (
        deployment.model.name,
        f"{deployment.model.name}:{deployment.model.version}",
        deployment.model.digest,
    )
