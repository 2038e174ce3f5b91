"""The whole serving path: real inference-workers (the engine on tiny random-weight Llama checkpoints)
+ the api-gateway over uvicorn + the official openai client, on a real nats-server."""

from __future__ import annotations

import pytest

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)

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

            reference = LLMEngine.from_pretrained(ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=64))
            prompt = "Once upon a time there was"
            expected = reference.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
            got = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
            assert got.choices[0].text == expected.text
            assert got.choices[0].finish_reason == "length"
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(expected.prompt_token_ids), 8)

            streamed = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
            assert "".join([c.choices[0].text async for c in streamed]) == expected.text

            chat = await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Call me Ishmael."}],
                                                        max_tokens=5, temperature=0)
            assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
            assert chat.system_fingerprint.startswith("other:1/")

            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="absent", messages=[{"role": "user", "content": "x"}])
    await bus.nc.close()
