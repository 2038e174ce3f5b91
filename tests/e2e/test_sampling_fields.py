"""Sampling and completion fields end to end: the official openai client (sync, async, stream) →
the gateway → NATS → a real inference-worker → the engine's batched sampler, on tiny random-weight
checkpoints, each answer compared with the engine run directly."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from services.inference_worker.service_layer.worker import Worker
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
                engine = LLMEngine.from_pretrained(
                    ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=64)
                )
                stack.worker = worker.part(Worker)  # type: ignore[attr-defined]
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
            got = await client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, extra_body=extra, **openai_fields
            )
            assert got.choices[0].text == want
            stream = await client.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=60,
                temperature=0,
                stream=True,
                extra_body=extra,
                **openai_fields,
            )
            assert await streamed(stream) == want
            sync = await asyncio.to_thread(
                sync_client(gateway).completions.create,
                model="tiny",
                prompt=PROMPT,
                max_tokens=60,
                temperature=0,
                extra_body=extra,
                **openai_fields,
            )
            assert sync.choices[0].text == want

        chat_plain = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0)
        chat = await client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=40,
            temperature=0,
            presence_penalty=2,
            extra_body={"repetition_penalty": 1.5},
        )
        assert chat.choices[0].message.content != chat_plain.choices[0].message.content
        chunks = await client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=40,
            temperature=0,
            stream=True,
            presence_penalty=2,
            extra_body={"repetition_penalty": 1.5},
        )
        assert (
            "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            == chat.choices[0].message.content
        )

        want = text_of(engine, PROMPT, max_tokens=30, temperature=1.5, seed=11, min_p=0.3)
        assert want != text_of(engine, PROMPT, max_tokens=30, temperature=1.5, seed=11)
        got = await client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=30, temperature=1.5, seed=11, extra_body={"min_p": 0.3}
        )
        assert got.choices[0].text == want


async def test_logit_bias_forces_or_bans_a_token_and_an_id_outside_the_vocabulary_is_400(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        token = engine.tokenizer.encode(" fox")[-1]
        piece = engine.tokenizer.decode([token])
        got = await client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, logit_bias={str(token): 100}
        )
        assert got.choices[0].text == piece * 5
        chat = await asyncio.to_thread(
            sync_client(gateway).chat.completions.create,
            model="tiny",
            messages=CHAT,
            max_tokens=4,
            logit_bias={str(token): 100},
        )
        assert chat.choices[0].message.content == piece * 4
        stream = await client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=5, logit_bias={str(token): 100}, stream=True
        )
        assert await streamed(stream) == piece * 5

        greedy = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
        banned = await client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(greedy): -100}, logprobs=0
        )
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
        sync = await asyncio.to_thread(
            sync_client(gateway).completions.create,
            model="tiny",
            prompt=[PROMPT],
            max_tokens=8,
            temperature=0,
            echo=True,
        )
        assert sync.choices[0].text == PROMPT + want
        chunks = [
            c
            async for c in await client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=True, stream=True
            )
        ]
        assert chunks[0].choices[0].text == PROMPT
        assert "".join(c.choices[0].text for c in chunks) == PROMPT + want
        plain = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=False)
        assert plain.choices[0].text == want
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1)
        assert "echo with logprobs is not supported" in caught.value.body["message"]


async def test_n_choices_each_with_its_own_seed_in_one_request(nats_server, tmp_path, ckpts):  # noqa: F811
    from services.inference_worker.service_layer.choices import choice_seed

    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        outs = engine.generate(
            [PROMPT] * 3, [SamplingParams(max_tokens=12, temperature=1.0, seed=choice_seed(5, i)) for i in range(3)]
        )
        got = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5, n=3)
        assert [c.index for c in got.choices] == [0, 1, 2]
        assert [c.text for c in got.choices] == [o.text for o in outs]
        assert len({c.text for c in got.choices}) == 3  # the choices differ
        assert got.usage.completion_tokens == sum(len(o.token_ids) for o in outs)
        assert got.usage.prompt_tokens == len(outs[0].prompt_token_ids)
        again = await asyncio.to_thread(
            sync_client(gateway).completions.create,
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=5,
            n=3,
        )
        assert [c.text for c in again.choices] == [o.text for o in outs]  # a seeded request is reproducible
        one = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5)
        assert one.choices[0].text == outs[0].text  # n=1 is choice 0

        stream = await client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=5,
            n=3,
            stream=True,
            echo=True,
            stream_options={"include_usage": True},
        )
        texts, finishes, usage = {}, {}, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                finishes[c.index] = c.finish_reason or finishes.get(c.index)
        assert texts == {i: PROMPT + o.text for i, o in enumerate(outs)}
        assert finishes == {i: o.finish_reason for i, o in enumerate(outs)}
        assert usage.completion_tokens == got.usage.completion_tokens

        chat = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=10, temperature=1.0, seed=9, n=2
        )
        assert [c.index for c in chat.choices] == [0, 1]
        assert chat.choices[0].message.content != chat.choices[1].message.content
        chunks = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=10, temperature=1.0, seed=9, n=2, stream=True
        )
        contents: dict[int, str] = {}
        async for chunk in chunks:
            for c in chunk.choices:
                contents[c.index] = contents.get(c.index, "") + (c.delta.content or "")
        assert contents == {c.index: c.message.content for c in chat.choices}


async def test_a_failing_request_with_n_choices_is_one_clear_error_and_frees_every_choice(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client()
        too_long = "The quick brown fox jumps over the lazy dog. " * 60
        assert len(engine.tokenizer.encode(too_long)) > 512  # past the model's positions
        for stream in (False, True):  # a stream too is refused before its 200
            with pytest.raises(openai.BadRequestError) as caught:
                await client.completions.create(model="tiny", prompt=too_long, max_tokens=4, n=4, stream=stream)
            assert caught.value.code == "context_length_exceeded", caught.value.body
        server = stack.worker.server  # type: ignore[attr-defined]
        assert not server.inflight and not server.choices
        [dep] = stack.worker.deployments.ready("tiny")  # type: ignore[attr-defined]
        for _ in range(50):
            if not dep.loop.engine.has_unfinished():
                break
            await asyncio.sleep(0.1)
        assert not dep.loop.engine.has_unfinished()  # no choice left running
        ok = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=4, temperature=0)
        assert len({c.text for c in ok.choices}) == 1 and len(ok.choices) == 4  # greedy choices agree
