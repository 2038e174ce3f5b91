"""The worker picks the runtime from the model's format: a GGUF deploys on llama.cpp and serves through
the same InferenceRequest contract, replies, streams and events as the engine; deploy.ready, the
inference event and the worker's models RPC name the runtime."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from services.inference_worker.service_layer.worker import Worker
from shared import rpc, subjects  # noqa: E402
from shared.events import (DeployFailed, DeployReady, DeployUnloaded, InferenceCompleted, Source,  # noqa: E402
                           UndeployRequested)
from shared.inference import LoadedModels, LoadedModelsRequest  # noqa: E402
from tests.inference_worker.conftest import make_worker  # noqa: E402
from tests.inference_worker.test_serving import stream  # noqa: E402
from tests.support.gguf_model import write_random_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-worker")
    write_random_gguf(d / "tiny.Q8_0.gguf", "q8_0", seed=4)
    return d


async def test_a_gguf_deploys_on_llama_cpp_and_serves_replies_streams_and_events(
    nats_server, tmp_path, bus_client, gguf_dir
):
    service = make_worker(nats_server.url, tmp_path / "worker", {"tiny-gguf": gguf_dir})
    async with service.running():
        scheduled = await bus_client.schedule("tiny-gguf", context_length=128, kv_cache_bytes=1 << 20)
        ready = await bus_client.wait(DeployReady, deployment_id=scheduled.deployment_id)
        assert ready.runtime == "llama.cpp" and ready.measured.weights > 0
        body = dict(messages=[{"role": "user", "content": "hi"}], sampling={"max_tokens": 6, "temperature": 0})
        reply = await bus_client.request("tiny-gguf", **body)
        assert reply.ok, reply.error
        assert reply.result["usage"]["completion_tokens"] <= 6
        messages = await stream(bus_client, "tiny-gguf", **body)
        assert [m.kind for m in messages][0] == "started" and messages[-1].kind == "end"
        assert "".join(m.text for m in messages if m.kind == "chunk") == reply.result["text"]
        done = await bus_client.wait(InferenceCompleted, request_id=messages[0].request_id)
        assert done.runtime == "llama.cpp" and done.completion_tokens == reply.result["usage"]["completion_tokens"]
        too_long = await bus_client.request("tiny-gguf", prompt="x" * 200, sampling={"max_tokens": 4})
        assert not too_long.ok and too_long.error.code == "context_length_exceeded"
        loaded = await rpc.call(
            bus_client.nc, subjects.rpc("inference-worker", "models"), LoadedModelsRequest(), LoadedModels
        )
        [dep] = loaded.deployments
        assert (dep.runtime, dep.max_model_len, dep.state) == ("llama.cpp", 128, "ready")
        # undeploy: drained, then llama.cpp's context and model are freed (not left to the GC)
        [held] = service.part(Worker).deployments.ready("tiny-gguf")  # type: ignore[attr-defined]
        engine = held.loop.engine
        await bus_client.emit(UndeployRequested(model_ref="tiny-gguf"), source=Source(service="cli", node="laptop"))
        await bus_client.wait(DeployUnloaded, deployment_id=scheduled.deployment_id)
        assert engine.ctx is None and engine.model is None


async def test_a_gguf_llama_cpp_cannot_load_fails_its_deploy_with_llama_cpps_reason(nats_server, tmp_path, bus_client):
    import gguf

    d = tmp_path / "bad"
    d.mkdir()
    w = gguf.GGUFWriter(str(d / "bad.gguf"), "llama")  # a readable header, but no vocabulary at all
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    service = make_worker(nats_server.url, tmp_path / "worker", {"bad": d})
    async with service.running():
        scheduled = await bus_client.schedule("bad", context_length=64)
        failed = await bus_client.wait(DeployFailed, deployment_id=scheduled.deployment_id)
        assert failed.reason.startswith("InvalidGguf: bad.gguf: llama.cpp could not load this GGUF: "), failed.reason
