"""The replies' parts that the registry assembles (their types: shared/inventory.py)."""

from __future__ import annotations

from services.hardware_inventory.domain import correction as corrections
from services.hardware_inventory.domain.model import Telemetry
from shared.inventory import Correction, EstimateView, FitEstimate, NodeRecord, NodeView


def estimate_view(raw: FitEstimate, correction: Correction | None) -> EstimateView:
    corrected = corrections.apply(correction, raw) if correction else raw
    return EstimateView(
        raw=raw,
        corrected=corrected,
        raw_total=raw.total,
        total=corrected.total,
        booked=corrected.booked,
        correction=correction if correction and correction.samples else None,
        correction_note=corrections.note(raw, correction),
    )


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
