"""Sampling and completion fields end to end: the official openai client (sync, async, stream) →
the gateway → NATS → a real inference-worker → the engine's batched sampler, on tiny random-weight
checkpoints, each answer compared with the engine run directly."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(120)
PROMPT = "Once upon a time there was"
CHAT = [{"role": "user", "content": "Call me Ishmael."}]


@asynccontextmanager
async def stack(nats_server, tmp_path, ckpts):  # noqa: F811
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    try:
        async with worker.running():
            await deployed(bus, "tiny")
            with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
                engine = LLMEngine.from_pretrained(ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=64))
                yield gateway, engine
    finally:
        await bus.nc.close()


def sync_client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key="sk-none", max_retries=0, timeout=30)


def text_of(engine: LLMEngine, prompt, **params) -> str:
    return engine.generate([prompt], SamplingParams(**params))[0].text


async def streamed(stream) -> str:
    return "".join([c.choices[0].text async for c in stream])


async def test_penalties_and_min_p_change_the_output_as_the_engine_does(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        plain = text_of(engine, PROMPT, max_tokens=60, temperature=0)
        for fields in ({"presence_penalty": 2.0, "frequency_penalty": 1.0}, {"repetition_penalty": 1.8}):
            want = text_of(engine, PROMPT, max_tokens=60, temperature=0, **fields)
            assert want != plain, fields  # the penalty visibly changes a random-weight model's output
            openai_fields = {k: v for k, v in fields.items() if k != "repetition_penalty"}
            extra = {"repetition_penalty": fields["repetition_penalty"]} if "repetition_penalty" in fields else None
            got = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, temperature=0,
                                                  extra_body=extra, **openai_fields)
            assert got.choices[0].text == want
            stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, stream=True,
                                                     extra_body=extra, **openai_fields)
            assert await streamed(stream) == want
            sync = await asyncio.to_thread(sync_client(gateway).completions.create, model="tiny", prompt=PROMPT, max_tokens=60,
                                           temperature=0, extra_body=extra, **openai_fields)
            assert sync.choices[0].text == want

        chat_plain = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0)
        chat = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0,
                                                    presence_penalty=2, extra_body={"repetition_penalty": 1.5})
        assert chat.choices[0].message.content != chat_plain.choices[0].message.content
        chunks = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0, stream=True,
                                                      presence_penalty=2, extra_body={"repetition_penalty": 1.5})
        assert "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices]) == chat.choices[0].message.content

        want = text_of(engine, PROMPT, max_tokens=30, temperature=1.5, seed=11, min_p=0.3)
        assert want != text_of(engine, PROMPT, max_tokens=30, temperature=1.5, seed=11)
        got = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=1.5, seed=11,
                                              extra_body={"min_p": 0.3})
        assert got.choices[0].text == want


async def test_logit_bias_forces_or_bans_a_token_and_an_id_outside_the_vocabulary_is_400(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        token = engine.tokenizer.encode(" fox")[-1]
        piece = engine.tokenizer.decode([token])
        got = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3,
                                              logit_bias={str(token): 100})
        assert got.choices[0].text == piece * 5
        chat = await asyncio.to_thread(sync_client(gateway).chat.completions.create, model="tiny", messages=CHAT, max_tokens=4,
                                       logit_bias={str(token): 100})
        assert chat.choices[0].message.content == piece * 4
        stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, logit_bias={str(token): 100},
                                                 stream=True)
        assert await streamed(stream) == piece * 5

        greedy = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
        banned = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0,
                                                 logit_bias={str(greedy): -100}, logprobs=0)
        assert banned.choices[0].logprobs.tokens[0] != engine.tokenizer.decode([greedy])

        vocab = engine.model_config.vocab_size
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.completions.create(model="tiny", prompt=PROMPT, logit_bias={str(vocab): 5}, stream=stream)
            assert "outside the vocabulary" in caught.value.body["message"]


async def test_echo_puts_the_prompt_before_the_completion(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        want = text_of(engine, PROMPT, max_tokens=8, temperature=0)
        got = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
        assert got.choices[0].text == PROMPT + want
        assert got.usage.completion_tokens == 8 and got.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
        sync = await asyncio.to_thread(sync_client(gateway).completions.create, model="tiny", prompt=[PROMPT], max_tokens=8,
                                       temperature=0, echo=True)
        assert sync.choices[0].text == PROMPT + want
        chunks = [c async for c in await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                                    echo=True, stream=True)]
        assert chunks[0].choices[0].text == PROMPT
        assert "".join(c.choices[0].text for c in chunks) == PROMPT + want
        plain = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=False)
        assert plain.choices[0].text == want
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1)
        assert "echo with logprobs is not supported" in caught.value.body["message"]
