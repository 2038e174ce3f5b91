"""inference-worker: loads the models scheduled on its node and serves them.

Wiring only: the contract (shared/contracts/inference.py) routes deploy events and the models op to the
Worker (service_layer/worker.py), which serves the per-model request subjects."""

from __future__ import annotations

from shared.config import Settings
from shared.contracts import inference as contract
from shared.service import Service
from shared.serving_asyncapi import add_serving_channels
from services.inference_worker.adapters.artifacts import ArtifactSource
from services.inference_worker.config import NAME, WorkerOptions
from services.inference_worker.service_layer.worker import Worker

__all__ = ["NAME", "Worker", "WorkerOptions", "create_service"]


def create_service(settings: Settings | None = None, *, artifacts: ArtifactSource | None = None,
                   options: WorkerOptions | None = None) -> Service:
    """``artifacts`` defaults to model-store (fetched and verified); tests may pass a LocalSource."""
    service = Service(NAME, settings, description="Loads models on this node and serves them.")
    options = options or WorkerOptions.from_env()

    async def start_worker() -> None:
        worker = Worker.build(service, artifacts, options)
        # provided before its start awaits anything: deploy events may come while it reads its journal
        service.provide(worker)
        await worker.start()

    async def stop_worker() -> None:
        # kept after its stop (not withdrawn): what it holds stays readable, and its handlers refuse new work
        await service.part(Worker).stop()

    # Every worker must see every deploy event, so each node has a durable of its own (the contract's {node}).
    service.consume_declared(contract.CONTRACT)
    service.serve(contract.CONTRACT)
    service.asyncapi_extensions.append(lambda doc: add_serving_channels(doc, NAME))
    service.on_start(start_worker)
    service.on_stop(stop_worker)
    _engine_gauges(service)
    return service


def _engine_gauges(service: Service) -> None:
    """Each ready deployment's engine, live, under vLLM's metric names with our prefix (what
    autoscalers such as KEDA read): read from the engine's stats on every scrape (none before the start)."""

    def read(stat: str):
        deployments = service.part(Worker).deployments.by_key.values() if service.has(Worker) else ()
        return [
            ([d.model.name, d.key], d.loop.engine.stats()[stat])
            for d in deployments
            if d.state == "ready" and d.loop is not None
        ]

    labels = ["model_name", "deployment"]
    m = service.metrics
    m.gauges(
        "strata:num_requests_running", "Requests in the engine's running batch", labels, lambda: read("num_running")
    )
    m.gauges("strata:num_requests_waiting", "Requests queued for the engine", labels, lambda: read("num_waiting"))
    m.gauges(
        "strata:kv_cache_usage_perc",
        "Share of the KV cache's blocks in use (0..1)",
        labels,
        lambda: read("kv_cache_usage"),
    )
    m.counters(
        "strata:num_preemptions",
        "Sequences preempted for lack of KV-cache blocks",
        labels,
        lambda: read("num_preemptions"),
    )
