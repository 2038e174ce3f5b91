"""The monitor keeps which runtime serves each deployment (deploy.ready's runtime, #17) for the dashboard."""
from __future__ import annotations

import time

from shared.events import DeployReady, MeasuredMemory, ModelId, Source, make_event
from services.monitor.domain.alerts import AlertEngine
from services.monitor.domain.state import FleetState
from services.monitor.service_layer.views import snapshot

MODEL = ModelId(name="tiny-gguf", version=1, digest="sha256:" + "a" * 64)


def test_deploy_ready_names_the_runtime_in_the_snapshot():
    state = FleetState()
    ready = DeployReady(deployment_id="dep-1", model=MODEL, node_id="n1", device="cpu",
                        measured=MeasuredMemory(weights=1, kv_cache=1, peak=2), load_seconds=0.1, runtime="llama.cpp")
    state.apply(make_event(ready, Source(service="inference-worker", node="n1")))
    old = DeployReady(deployment_id="dep-2", model=MODEL.model_copy(update={"version": 2}), node_id="n1", device="cpu",
                      measured=MeasuredMemory(weights=1, kv_cache=1, peak=2), load_seconds=0.1)  # a worker before #17
    state.apply(make_event(old, Source(service="inference-worker", node="n1")))
    views = {d.deployment_id: d for d in snapshot(state, AlertEngine([]), time.time(), 60, 10).deployments}
    assert (views["dep-1"].runtime, views["dep-1"].state) == ("llama.cpp", "ready")
    assert views["dep-2"].runtime is None
