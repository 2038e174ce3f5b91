"""Deploy lifecycle against a real nats-server: scheduled → loading → ready with measured figures;
failures end in deploy.failed with the reason while the worker keeps serving; idempotency; undeploy."""

from __future__ import annotations

import time

import pytest
from nats.errors import NoRespondersError

from services.inference_worker.service_layer.worker import Worker
from shared import rpc, subjects
from shared.events import (
    DeployFailed,
    DeployLoading,
    DeployReady,
    DeployReleased,
    DeployUnloaded,
    UndeployRequested,
    Source,
)
from shared.inference import InferenceRequest, LoadedModels, LoadedModelsRequest
from tests.inference_worker.conftest import deployed, model_id, wait_for

CLIENT = Source(service="client", node="cli")


async def test_scheduled_loads_and_reports_measured_memory(worker, bus_client):
    scheduled = await bus_client.schedule("tiny")
    loading = await bus_client.wait(DeployLoading, deployment_id="dep-tiny")
    ready = await bus_client.wait(DeployReady, deployment_id="dep-tiny")
    assert loading.node_id == ready.node_id == "node-a" and ready.device == "cpu"
    assert ready.model == scheduled.model
    m = ready.measured
    assert m.weights > 0 and m.kv_cache > 0 and m.peak >= m.weights + m.kv_cache
    assert m.kv_cache <= scheduled.kv_cache_bytes  # sized to what was booked
    assert ready.load_seconds > 0
    assert ready.dtype == "float32" and ready.quantize is None  # which weights answer, for the ledger
    # the loading event came first
    types = [e.type for e in bus_client.events if e.type.startswith("deploy.") and e.data.deployment_id == "dep-tiny"]
    assert types.index("deploy.loading") < types.index("deploy.ready")


async def test_other_nodes_deployments_are_ignored_and_redelivery_does_not_load_twice(worker, bus_client):
    await bus_client.schedule("other", "dep-elsewhere", node_id="node-b")
    await deployed(bus_client, "tiny")
    await bus_client.schedule("tiny")  # the same deployment again (a new event id)
    listing = await rpc.call(
        bus_client.nc, subjects.rpc("inference-worker", "models"), LoadedModelsRequest(), LoadedModels
    )
    assert [d.deployment_id for d in listing.deployments] == ["dep-tiny"]
    assert listing.node_id == "node-a" and listing.deployments[0].state == "ready"
    assert listing.deployments[0].model == model_id("tiny")
    assert len(bus_client.of(DeployLoading, deployment_id="dep-tiny")) == 1
    assert not bus_client.of(DeployLoading, deployment_id="dep-elsewhere")


@pytest.mark.parametrize(
    "name, reason",
    [("unknown", "unsupported architecture"), ("corrupt", "bad checkpoint"), ("missing", "no local checkpoint")],
)
async def test_a_bad_checkpoint_fails_the_deploy_and_the_worker_serves_on(worker, bus_client, name, reason):
    await deployed(bus_client, "tiny")
    await bus_client.schedule(name)
    failed = await bus_client.wait(DeployFailed, deployment_id=f"dep-{name}")
    assert reason in failed.reason and failed.node_id == "node-a"
    if name != "missing":
        assert "config.json" in failed.reason or "safetensors" in failed.reason  # names the file
    reply = await bus_client.request("tiny", prompt="The quick", sampling={"max_tokens": 3, "temperature": 0})
    assert reply.ok and reply.result["usage"]["completion_tokens"] == 3


async def test_two_models_at_once_then_undeploy_one(worker, bus_client):
    await deployed(bus_client, "tiny")
    await deployed(bus_client, "other")
    for name in ("tiny", "other"):
        reply = await bus_client.request(name, prompt="It was", sampling={"max_tokens": 2, "temperature": 0})
        assert reply.ok and reply.result["model"]["name"] == name
    await bus_client.emit(UndeployRequested(model_ref="other"), source=CLIENT)
    unloaded = await bus_client.wait(DeployUnloaded, deployment_id="dep-other")
    assert unloaded.model == model_id("other")
    started = time.monotonic()
    with pytest.raises(NoRespondersError):  # not deployed: an immediate answer, not a time-out
        await bus_client.nc.request(
            subjects.inference_request("other"),
            InferenceRequest(model="other", prompt="x").model_dump_json().encode(),
            timeout=5,
        )
    assert time.monotonic() - started < 1.0
    assert (await bus_client.request("tiny", prompt="x", sampling={"max_tokens": 1})).ok
    # a release from the inventory (e.g. the node was evicted) unloads as well
    await bus_client.emit(
        DeployReleased(
            deployment_id="dep-tiny", model=model_id("tiny"), node_id="node-a", device="cpu", reason="evicted"
        )
    )
    await bus_client.wait(DeployUnloaded, deployment_id="dep-tiny")
    listing = await rpc.call(
        bus_client.nc, subjects.rpc("inference-worker", "models"), LoadedModelsRequest(), LoadedModels
    )
    assert listing.deployments == []
    await wait_for(lambda: not worker.part(Worker)._subs, what="request subscriptions gone")


async def test_int8_deploy_serves_quantized_weights_and_says_so(worker, bus_client):
    await bus_client.schedule("tiny", "dep-tiny-q8", quantize="int8")
    ready = await bus_client.wait(DeployReady, deployment_id="dep-tiny-q8")
    assert ready.quantize == "int8" and ready.dtype == "float32"  # the event asked for float32 activations


async def test_a_worker_set_to_compile_decode_compiles_at_load_serves_and_says_so(nats_server, tmp_path, ckpts,
                                                                                  bus_client):
    """STRATA_INFERENCE_WORKER_COMPILE_DECODE=auto: the decode step is compiled before deploy.ready (so
    the first request does not wait for it), and the event records it for the ledger."""
    from services.inference_worker.service_layer.deployments import EngineOptions
    from tests.inference_worker.conftest import make_worker

    service = make_worker(nats_server.url, tmp_path / "worker", ckpts,
                          engine=EngineOptions(max_num_seqs=4, compile_decode="auto"))
    async with service.running():
        await bus_client.schedule("tiny", "dep-compiled")
        ready = await bus_client.wait(DeployReady, timeout=240.0, deployment_id="dep-compiled")
        assert ready.compiled_decode and ready.dtype == "float32"
        reply = await bus_client.request("tiny", prompt="hello", sampling={"max_tokens": 4, "temperature": 0})
        assert reply.ok


def test_a_bad_compile_decode_setting_is_refused_with_its_variable():
    from services.inference_worker.config import WorkerOptions

    assert WorkerOptions.from_env({}).engine.compile_decode == "off"
    assert WorkerOptions.from_env({"STRATA_INFERENCE_WORKER_COMPILE_DECODE": "auto"}).engine.compile_decode == "auto"
    with pytest.raises(ValueError, match="STRATA_INFERENCE_WORKER_COMPILE_DECODE"):
        WorkerOptions.from_env({"STRATA_INFERENCE_WORKER_COMPILE_DECODE": "on"})
