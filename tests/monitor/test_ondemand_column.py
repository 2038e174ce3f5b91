"""The monitor keeps whether an on-demand deployment is loaded (deploy.ready with on_demand, then
deploy.model_loaded / model_unloaded) for the dashboard; an always-on one says nothing of it."""
from __future__ import annotations

import time

from shared.events import DeployReady, MeasuredMemory, ModelId, ModelLoaded, ModelUnloaded, Source, make_event
from services.monitor.domain.alerts import AlertEngine
from services.monitor.domain.state import FleetState
from services.monitor.service_layer.views import snapshot

MODEL = ModelId(name="lazy", version=1, digest="sha256:" + "b" * 64)
WORKER = Source(service="inference-worker", node="n1")
ZERO = MeasuredMemory(weights=0, kv_cache=0, peak=0)


def loaded_state(state: FleetState) -> dict[str, bool | None]:
    return {d.deployment_id: d.loaded for d in snapshot(state, AlertEngine([]), time.time(), 60, 10).deployments}


def test_an_on_demand_deployment_shows_loaded_then_unloaded():
    state = FleetState()
    state.apply(make_event(DeployReady(deployment_id="lazy-1", model=MODEL, node_id="n1", device="cpu", measured=ZERO,
                                       load_seconds=0, on_demand=True), WORKER))
    state.apply(make_event(DeployReady(deployment_id="eager-1", model=MODEL, node_id="n1", device="cpu", measured=ZERO,
                                       load_seconds=0), WORKER))
    assert loaded_state(state) == {"lazy-1": False, "eager-1": None}
    state.apply(make_event(ModelLoaded(deployment_id="lazy-1", model=MODEL, node_id="n1", device="cpu",
                                       measured=MeasuredMemory(weights=1, kv_cache=1, peak=2), load_seconds=0.1,
                                       runtime="llama.cpp"), WORKER))
    assert loaded_state(state)["lazy-1"] is True
    view = {d.deployment_id: d for d in snapshot(state, AlertEngine([]), time.time(), 60, 10).deployments}["lazy-1"]
    assert (view.state, view.runtime) == ("ready", "llama.cpp")
    state.apply(
        make_event(
            ModelUnloaded(deployment_id="lazy-1", model=MODEL, node_id="n1", device="cpu", reason="idle"), WORKER
        )
    )
    assert loaded_state(state)["lazy-1"] is False
