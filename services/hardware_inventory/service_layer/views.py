"""Bodies of the HTTP API and the RPC replies (pydantic): what `strata nodes/fit/deployments` show."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.hardware_inventory.domain.correction import Correction, note
from services.hardware_inventory.domain.fit import FitEstimate
from services.hardware_inventory.domain.model import Deployment, NodeRecord, Policy, Telemetry
from shared.events import EmbeddingPooling, ModelId


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

    @classmethod
    def of(cls, raw: FitEstimate, correction: Correction | None) -> EstimateView:
        corrected = correction.apply(raw) if correction else raw
        return cls(
            raw=raw,
            corrected=corrected,
            raw_total=raw.total,
            total=corrected.total,
            booked=corrected.booked,
            correction=correction if correction and correction.samples else None,
            correction_note=note(raw, correction),
        )


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


def node_view(
    node: NodeRecord, live: Telemetry | None, now: float, booked: dict[str, int], available: dict[str, int]
) -> NodeView:
    return NodeView(
        node=node,
        ram_free=live.ram_free if live else None,
        utilisation=live.utilisation if live else {},
        loaded_models=live.loaded_models if live else [],
        seconds_since_heartbeat=round(now - live.received_at, 3) if live else None,
        booked=booked,
        available=available,
    )
