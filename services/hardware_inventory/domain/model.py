"""The registry's own records: a node's live telemetry, and every deployment in one document (stored as
JSON in the JetStream KV bucket, see adapters/state.py). Nodes, deployments and replicas are the
inventory's contract (shared/inventory.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.events import DeviceInfo
from shared.inventory import Deployment


class Telemetry(BaseModel):
    """The latest heartbeat of a node: live, kept in memory by each registry replica."""

    ram_free: int
    devices: dict[str, DeviceInfo] = {}
    utilisation: dict[str, float] = {}
    loaded_models: list[str] = []
    received_at: float = Field(description="monotonic seconds")


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
