"""On-demand deployments on a real worker over a real nats-server, for both runtimes: nothing loaded at
deploy; the first request loads and answers; an idle keep-alive unloads (deploy.model_unloaded); the next
request loads again; with memory for one of two, the least recently used is evicted; a load that fails
is a clear error to the requester with nothing left loaded."""

from __future__ import annotations

import time

import pytest

from services.inference_worker.service_layer.worker import Worker
from shared import rpc, subjects
from shared.events import (
    DeployReady,
    ModelLoaded,
    ModelLoadFailed,
    ModelUnloaded,
    Source,
    UndeployRequested,
    DeployUnloaded,
)
from shared.inference import LoadedModels, LoadedModelsRequest
from tests.inference_worker.conftest import make_worker, wait_for

MB = 1 << 20
BODY = dict(prompt="The quick", sampling={"max_tokens": 3, "temperature": 0})


async def listing(bus_client) -> dict[str, object]:
    loaded = await rpc.call(
        bus_client.nc, subjects.rpc("inference-worker", "models"), LoadedModelsRequest(), LoadedModels
    )
    return {d.deployment_id: d for d in loaded.deployments}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from tests.support.gguf_model import write_random_gguf

    root = tmp_path_factory.mktemp("gguf-ondemand")
    (root / "tiny").mkdir()
    (root / "corrupt").mkdir()
    good = write_random_gguf(root / "tiny" / "tiny.Q8_0.gguf", "q8_0", seed=4)
    data = good.read_bytes()
    (root / "corrupt" / "tiny.Q8_0.gguf").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(params=["strata-engine", "llama.cpp"])
def runtime(request) -> str:
    return request.param


@pytest.fixture
def sources(runtime, request, ckpts):
    """name -> files, for one runtime: safetensors for the engine, GGUF for llama.cpp ('corrupt': cut short)."""
    if runtime == "strata-engine":
        return {"tiny": ckpts["tiny"], "other": ckpts["other"], "corrupt": ckpts["corrupt"]}
    gguf = request.getfixturevalue("gguf_dir")
    return {"tiny": gguf / "tiny", "other": gguf / "tiny", "corrupt": gguf / "corrupt"}


async def test_loaded_by_its_first_request_unloaded_when_idle_and_loaded_again(
    nats_server, tmp_path, bus_client, sources, runtime
):
    service = make_worker(nats_server.url, tmp_path / "worker", sources)
    async with service.running():
        scheduled = await bus_client.schedule(
            "tiny", on_demand=True, keep_alive_s=0.5, context_length=128, booked_bytes=64 * MB
        )
        ready = await bus_client.wait(DeployReady, deployment_id=scheduled.deployment_id)
        assert ready.on_demand and ready.measured.peak == 0  # serving, nothing loaded
        dep = (await listing(bus_client))[scheduled.deployment_id]
        assert dep.on_demand and not dep.loaded and dep.keep_alive_s == 0.5 and dep.state == "ready"
        assert not bus_client.of(ModelLoaded)

        started = time.monotonic()
        reply = await bus_client.request("tiny", **BODY)
        cold = time.monotonic() - started
        assert reply.ok, reply.error
        loaded = await bus_client.wait(ModelLoaded, deployment_id=scheduled.deployment_id)
        assert loaded.request_id == reply.result["request_id"] and loaded.measured.peak > 0 and loaded.load_seconds > 0
        assert loaded.runtime == runtime

        unloaded = await bus_client.wait(ModelUnloaded, deployment_id=scheduled.deployment_id)
        assert unloaded.reason == "idle" and unloaded.idle_seconds >= 0.5 and unloaded.freed_bytes > 0
        assert not (await listing(bus_client))[scheduled.deployment_id].loaded

        again = await bus_client.request("tiny", **BODY)
        assert again.ok and again.result["text"] == reply.result["text"]  # the same weights, greedy
        await wait_for(
            lambda: len(bus_client.of(ModelLoaded, deployment_id=scheduled.deployment_id)) == 2, what="a second load"
        )
        started = time.monotonic()
        assert (await bus_client.request("tiny", **BODY)).ok
        warm = time.monotonic() - started
        print(
            f"\n{loaded.runtime}: load {loaded.load_seconds:.3f}s, unload {unloaded.unload_seconds:.3f}s, "
            f"first request {cold:.3f}s (with load), warm {warm:.3f}s"
        )


async def test_with_memory_for_one_the_least_recently_used_is_evicted(nats_server, tmp_path, bus_client, sources):
    # a booking the size of the whole budget: the other one loaded leaves too little for it
    service = make_worker(nats_server.url, tmp_path / "worker", sources, ondemand_memory_bytes=512 * MB)
    async with service.running():
        for name in ("tiny", "other"):
            s = await bus_client.schedule(
                name, on_demand=True, keep_alive_s=300, context_length=128, booked_bytes=512 * MB
            )
            await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        assert (await bus_client.request("tiny", **BODY)).ok
        assert (await bus_client.request("other", **BODY)).ok
        evicted = await bus_client.wait(ModelUnloaded, deployment_id="dep-tiny")
        assert evicted.reason == "evicted" and evicted.for_deployment == "dep-other"
        other = await bus_client.wait(ModelLoaded, deployment_id="dep-other")
        assert other.evicted == ["dep-tiny"]
        held = await listing(bus_client)
        assert not held["dep-tiny"].loaded and held["dep-other"].loaded
        # undeploying an unloaded on-demand deployment ends it as any other (deploy.unloaded)
        await bus_client.emit(UndeployRequested(model_ref="tiny"), source=Source(service="cli", node="laptop"))
        await bus_client.wait(DeployUnloaded, deployment_id="dep-tiny")


async def test_a_load_that_fails_is_a_clear_error_and_nothing_stays_loaded(
    nats_server, tmp_path, bus_client, sources, runtime
):
    service = make_worker(nats_server.url, tmp_path / "worker", sources)
    async with service.running():
        s = await bus_client.schedule("corrupt", on_demand=True, context_length=128, booked_bytes=64 * MB)
        await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        reply = await bus_client.request("corrupt", **BODY)
        assert not reply.ok and reply.error.code == "model_load_failed"
        assert "could not load corrupt:1 on node-a: " in reply.error.message, reply.error.message
        if runtime == "strata-engine":
            assert "bad checkpoint" in reply.error.message and "safetensors" in reply.error.message  # names the file
        else:
            assert "tiny.Q8_0.gguf: llama.cpp could not load this GGUF" in reply.error.message
        failed = await bus_client.wait(ModelLoadFailed, deployment_id=s.deployment_id)
        assert failed.reason in reply.error.message
        assert not (await listing(bus_client))[s.deployment_id].loaded
        assert not bus_client.of(ModelLoaded)


@pytest.fixture
def held_load():
    """Make the worker's next loads wait for ``release.set()`` (on the load thread), and say when one waits."""
    import threading

    release, waiting = threading.Event(), threading.Event()

    def hold(worker_service):
        deployments = worker_service.part(Worker).deployments
        original = deployments._load

        def slow(artifact, event):
            waiting.set()
            assert release.wait(30), "the test never released the load"
            return original(artifact, event)

        deployments._load = slow

    yield hold, release, waiting
    release.set()


async def test_past_the_load_time_out_the_request_is_told_to_retry_and_the_load_goes_on(
    nats_server, tmp_path, bus_client, ckpts, held_load
):
    hold, release, waiting = held_load
    service = make_worker(nats_server.url, tmp_path / "worker", {"tiny": ckpts["tiny"]}, load_timeout_s=0.2)
    async with service.running():
        hold(service)
        s = await bus_client.schedule("tiny", on_demand=True, context_length=128, booked_bytes=64 * MB)
        await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        reply = await bus_client.request("tiny", **BODY)
        assert not reply.ok and reply.error.code == "model_loading"
        assert "tiny:1 is still loading on node-a after 0.2s" in reply.error.message and "retry" in reply.error.message
        release.set()
        await bus_client.wait(ModelLoaded, deployment_id=s.deployment_id)  # the load went on without a waiter
        assert (await bus_client.request("tiny", **BODY)).ok
        assert len(bus_client.of(ModelLoaded)) == 1


async def test_a_stream_waits_for_the_load_and_can_be_cancelled_meanwhile(
    nats_server, tmp_path, bus_client, ckpts, held_load
):
    import asyncio

    from shared.inference import CANCEL_SUBJECT, InferenceCancel
    from tests.inference_worker.test_serving import stream

    hold, release, waiting = held_load
    service = make_worker(nats_server.url, tmp_path / "worker", {"tiny": ckpts["tiny"]})
    async with service.running():
        hold(service)
        s = await bus_client.schedule("tiny", on_demand=True, context_length=128, booked_bytes=64 * MB)
        await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        long = dict(prompt="The quick", sampling={"max_tokens": 100, "temperature": 0}, request_id="lazy-stream")
        streaming = asyncio.ensure_future(stream(bus_client, "tiny", **long))
        assert await asyncio.to_thread(waiting.wait, 10)  # the load started, held
        await bus_client.nc.publish(
            CANCEL_SUBJECT, InferenceCancel(request_id="lazy-stream").model_dump_json().encode()
        )
        await wait_for(lambda: "lazy-stream" in service.part(Worker).server.cancelled_early, what="the cancel noted")
        release.set()
        messages = await streaming
        assert messages[0].kind == "started" and messages[-1].kind == "end", messages
        assert messages[-1].finish_reason == "cancelled"  # it never ran its 100 tokens
        assert not service.part(Worker).server.cancelled_early and not service.part(Worker).server.waiting_for_load


async def test_an_embeddings_request_loads_an_on_demand_model_too(nats_server, tmp_path, bus_client, ckpts):
    from shared.embeddings import EmbeddingRequest, embed

    service = make_worker(nats_server.url, tmp_path / "worker", {"tiny": ckpts["tiny"]})
    async with service.running():
        s = await bus_client.schedule("tiny", on_demand=True, context_length=128, booked_bytes=64 * MB)
        await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        vectors = await embed(bus_client.nc, EmbeddingRequest(model="tiny", inputs=["Call me Ishmael."]))
        assert vectors.reply.count == 1
        loaded = await bus_client.wait(ModelLoaded, deployment_id=s.deployment_id)
        assert loaded.request_id == vectors.reply.request_id


async def test_a_reply_waiting_for_a_load_gets_keepalives_meanwhile(
    nats_server, tmp_path, bus_client, ckpts, held_load
):
    """The gateway's client takes silence for a dead worker: a long load keeps it told."""
    from shared.inference import InferenceRequest
    from shared.inference_client import is_keepalive
    from shared.rpc import RpcReply

    hold, release, waiting = held_load
    service = make_worker(nats_server.url, tmp_path / "worker", {"tiny": ckpts["tiny"]})
    async with service.running():
        hold(service)
        s = await bus_client.schedule("tiny", on_demand=True, context_length=128, booked_bytes=64 * MB)
        await bus_client.wait(DeployReady, deployment_id=s.deployment_id)
        inbox = bus_client.nc.new_inbox()
        sub = await bus_client.nc.subscribe(inbox)
        request = InferenceRequest(model="tiny", keepalive=True, **BODY)
        await bus_client.nc.publish(subjects.inference_request("tiny"), request.model_dump_json().encode(), reply=inbox)
        first = await sub.next_msg(timeout=10)
        assert is_keepalive(first.data) and not bus_client.of(ModelLoaded)  # told while the load is held
        release.set()
        while is_keepalive((msg := await sub.next_msg(timeout=20)).data):
            pass
        assert RpcReply.model_validate_json(msg.data).ok
