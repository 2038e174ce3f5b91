"""Fault: kill -9 the only worker while requests stream, then start it again on the same data dir (as
`strata up`'s supervisor does). #20 item 2: it came back without its models (404 for minutes) and the
cut requests left no inference.failed, so the error-rate alert stayed "ok"."""

from __future__ import annotations

import asyncio
import signal

import pytest

from shared.assignments import Assigned, AssignedRequest
from shared.events import DeployReady, DeployScheduled, InferenceFailed
from shared.inference import InferenceRequest, SamplingOptions
from shared.inference_client import complete, stream
from shared.service import Service
from tests.faults.support import KV_BYTES, MODEL, EventWatch, spawn_worker, stop_process
from tests.support.helpers import eventually, settings_for

pytestmark = pytest.mark.timeout(240)
NODE = "node-restart"


def scripted_registry(nats_url: str, data_dir, placed: DeployScheduled) -> Service:
    """hardware-inventory's registry as far as a starting worker asks it: what is booked on its node."""
    service = Service("hardware-inventory", settings_for("hardware-inventory", nats_url, data_dir))
    asked: list[str] = []

    @service.rpc("assigned", AssignedRequest)
    async def assigned(request: AssignedRequest) -> Assigned:
        asked.append(request.node_id)
        return Assigned(scheduled=[placed] if request.node_id == placed.node_id else [])

    service.asked = asked  # type: ignore[attr-defined]
    return service


async def test_a_killed_worker_comes_back_with_its_models_and_reports_the_requests_it_cut(nats_server, tmp_path):
    watch = await EventWatch.connect(nats_server.url)
    placed = DeployScheduled(deployment_id=f"dep-{NODE}", model=MODEL, node_id=NODE, device="cpu", predicted_bytes=1,
                             context_length=256, model_ref=f"{MODEL.name}:1", kv_cache_bytes=KV_BYTES, dtype="float32")
    registry = scripted_registry(nats_server.url, tmp_path / "registry", placed)
    worker = spawn_worker(nats_server.url, tmp_path / NODE, NODE)
    try:
        async with registry.running():
            await eventually(
                lambda: watch.of(DeployReady, node_id=NODE), 90, "the first load (reconciled from the registry)"
            )
            streams = [asyncio.create_task(_stream_long(watch, i)) for i in range(3)]
            await eventually(lambda: len(_started) >= 3, 60, "three requests streaming")
            worker.send_signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 10)
            await asyncio.gather(*streams, return_exceptions=True)

            worker = spawn_worker(nats_server.url, tmp_path / NODE, NODE)  # the supervisor's restart
            await eventually(lambda: len(watch.of(DeployReady, node_id=NODE)) == 2, 90, "the model loaded again")
            answer = await complete(
                watch.nc,
                InferenceRequest(
                    model=MODEL.name, prompt="And God said", sampling=SamplingOptions(max_tokens=2, temperature=0)
                ),
            )
            assert answer.usage.completion_tokens == 2
            await eventually(
                lambda: {f.request_id for f in watch.of(InferenceFailed)} >= set(_started),
                30,
                "inference.failed for each request the kill cut",
            )
            failed = {f.request_id: f for f in watch.of(InferenceFailed)}
            assert all(
                failed[rid].node_id == NODE and "stopped (killed or crashed)" in failed[rid].reason for rid in _started
            )
            assert registry.asked == [NODE, NODE]  # type: ignore[attr-defined]
    finally:
        stop_process(worker)
        await watch.nc.close()


_started: list[str] = []


async def _stream_long(watch: EventWatch, i: int) -> None:
    request = InferenceRequest(
        model=MODEL.name, prompt=f"In the beginning {i}", sampling=SamplingOptions(max_tokens=200, temperature=0)
    )
    async for _message in stream(watch.nc, request, silence_timeout_s=5):
        if request.request_id not in _started:
            _started.append(request.request_id)
