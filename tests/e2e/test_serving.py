"""The whole serving path: real inference-workers (the engine on tiny random-weight Llama checkpoints)
+ the api-gateway over uvicorn + the official openai client, on a real nats-server."""

from __future__ import annotations

import pytest

from shared.events import DeployReady, DeployScheduled, ModelId
from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import KV_BYTES, ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)
from tests.inference_worker.test_process import LONG, long_ckpt, pushed, spawn_worker, stop  # noqa: F401  (fixtures)
from tests.support.live import in_flight_by_node

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(120)


async def test_two_models_served_at_once_and_greedy_equals_the_engine(nats_server, tmp_path, ckpts):  # noqa: F811
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    async with worker.running():
        await deployed(bus, "tiny")
        await deployed(bus, "other")
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            client = gateway.client()
            assert sorted(m.id for m in (await client.models.list()).data) == ["other", "tiny"]

            reference = LLMEngine.from_pretrained(
                ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=64)
            )
            prompt = "Once upon a time there was"
            expected = reference.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
            got = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
            assert got.choices[0].text == expected.text
            assert got.choices[0].finish_reason == "length"
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(expected.prompt_token_ids), 8)

            streamed = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
            )
            assert "".join([c.choices[0].text async for c in streamed]) == expected.text

            chat = await client.chat.completions.create(
                model="other", messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=5, temperature=0
            )
            assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
            assert chat.system_fingerprint.startswith("other:1/")

            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="absent", messages=[{"role": "user", "content": "x"}])
    await bus.nc.close()


async def deploy_on(bus, model: ModelId, node_id: str) -> DeployReady:
    """Schedule ``model`` on ``node_id`` as hardware-inventory would, and wait until it is ready."""
    deployment_id = f"dep-{node_id}"
    await bus.emit(
        DeployScheduled(
            deployment_id=deployment_id,
            model=model,
            node_id=node_id,
            device="cpu",
            predicted_bytes=1,
            context_length=2048,
            model_ref=model.name,
            kv_cache_bytes=KV_BYTES,
            dtype="float32",
        )
    )
    return await bus.wait(DeployReady, timeout=90, deployment_id=deployment_id)


async def test_killing_a_worker_mid_stream_errors_the_client_and_the_other_replica_serves(
    nats_server, tmp_path, pushed
):  # noqa: F811
    import asyncio
    import signal

    bus = await connect_bus(nats_server.url, "node-1")
    procs = {node: spawn_worker(nats_server.url, tmp_path / node, node) for node in ("node-1", "node-2")}
    try:
        await asyncio.gather(*(deploy_on(bus, pushed.model, node) for node in procs))
        with serve_gateway(
            nats_server.url, tmp_path / "gw", TEST_CONFIG.model_copy(update={"silence_timeout_s": 3.0})
        ) as gateway:
            client = gateway.client()
            models = (await client.models.list()).data
            assert [m.id for m in models] == ["long"]

            stream = await client.completions.create(
                model="long", prompt="It was", max_tokens=LONG, temperature=0, stream=True
            )
            received = [await anext(aiter(stream))]
            counts = await in_flight_by_node(bus.nc, workers=2, model="long")
            serving = [node for node, n in counts.items() if n > 0]
            assert len(serving) == 1, counts
            victim, survivor = serving[0], next(n for n in procs if n != serving[0])
            procs[victim].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[victim].wait, 10)

            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    received.append(chunk)
            assert "fell silent" in caught.value.message
            assert len(received) < LONG, "the stream was cut, not finished"

            for _ in range(3):  # the dead worker's subscription is gone: every new request reaches the survivor
                again = await client.completions.create(model="long", prompt="It was", max_tokens=4, temperature=0)
                assert again.usage.completion_tokens == 4
            assert set(await in_flight_by_node(bus.nc, workers=1, model="long")) == {survivor}
    finally:
        for proc in procs.values():
            stop(proc)
        await bus.nc.close()
