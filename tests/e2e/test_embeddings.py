"""/v1/embeddings end to end (#18): the official openai client → the gateway → NATS → a real
inference-worker → the engine's pooled hidden states, on a tiny random-weight checkpoint; each vector
compared with the engine run directly, and the worker's inference.embedded receipt checked against
what the client got."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import httpx
import numpy as np
import pytest

from cli.main import main as cli_main
from services.inference_worker.engine import EngineConfig, LLMEngine
from shared.embeddings import input_bytes
from shared.events import EmbeddingsCompleted
from shared.prompt_commitment import SALT_HEADER, commit
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.e2e.test_sampling_fields import stack
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(120)
TEXTS = ["The quick brown fox", "Call me Ishmael. Some years ago, never mind how long precisely.", "It was"]
CONTEXT = 256  # the test deployments' context_length


async def test_embeddings_through_the_openai_client(nats_server, tmp_path, ckpts):  # noqa: F811
    bus = await connect_bus(nats_server.url, "node-b")  # hears the worker's events
    try:
        async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
            await _inputs_and_formats(gateway, engine)
            await _receipt(gateway, bus)
            await _refusals(gateway, engine)
    finally:
        await bus.nc.close()


async def _inputs_and_formats(gateway, engine: LLMEngine) -> None:
    client = gateway.client()
    want = engine.embed(TEXTS)
    ids = [engine.tokenizer.encode(t) for t in TEXTS]

    one = await client.embeddings.create(model="tiny", input=TEXTS[0])
    assert one.object == "list" and one.model == "tiny" and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    assert len(one.data[0].embedding) == engine.model_config.hidden_size
    np.testing.assert_allclose(one.data[0].embedding, want.vectors[0].numpy(), atol=1e-5)
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[0])

    many = await client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    np.testing.assert_allclose([d.embedding for d in many.data], want.vectors.numpy(), atol=1e-5)
    assert many.usage.prompt_tokens == sum(len(i) for i in ids)
    assert np.allclose(np.linalg.norm([d.embedding for d in many.data], axis=1), 1.0, atol=1e-5)

    tokens = await client.embeddings.create(model="tiny", input=ids)  # a list of token-id lists
    np.testing.assert_allclose([d.embedding for d in tokens.data], want.vectors.numpy(), atol=1e-5)
    single = await client.embeddings.create(model="tiny", input=ids[1])  # one token-id list
    np.testing.assert_allclose(single.data[0].embedding, want.vectors[1].numpy(), atol=1e-5)

    # base64: the raw JSON (the openai client decodes base64 itself, so read what the gateway sent)
    async with httpx.AsyncClient(base_url=gateway.v1, timeout=30) as http:
        raw = await http.post("/embeddings", json={"model": "tiny", "input": TEXTS, "encoding_format": "base64"},
                              headers={"Authorization": "Bearer sk-none"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert all(isinstance(d["embedding"], str) for d in body["data"])
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    np.testing.assert_allclose(decoded, want.vectors.numpy(), atol=1e-5)
    assert body["system_fingerprint"].startswith("tiny:1/sha256:")

    # OpenAI's largest batch: 2048 inputs, their vectors over several NATS messages, in input order
    texts = [f"{TEXTS[i % 3]} {i}" for i in range(2048)]
    big = await client.embeddings.create(model="tiny", input=texts, encoding_format="float")  # written off the loop
    assert [d.index for d in big.data] == list(range(2048))
    some = [0, 777, 2047]
    np.testing.assert_allclose(
        [big.data[i].embedding for i in some], engine.embed([texts[i] for i in some]).vectors.numpy(), atol=1e-5
    )

    # Matryoshka dimensions: the first 16 components, renormalised
    short = await client.embeddings.create(model="tiny", input=TEXTS, dimensions=16)
    got = np.array([d.embedding for d in short.data], dtype=np.float32)
    head = want.vectors[:, :16].numpy()
    np.testing.assert_allclose(got, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-5)


async def _receipt(gateway, bus) -> None:
    async with httpx.AsyncClient(base_url=gateway.v1, timeout=30) as http:
        answer = await http.post(
            "/embeddings",
            json={"model": "tiny", "input": TEXTS, "encoding_format": "base64"},
            headers={"Authorization": "Bearer sk-none", "x-request-id": "mine-1"},
        )
    assert answer.status_code == 200
    request_id, salt = answer.headers["x-strata-request-id"], answer.headers[SALT_HEADER]
    event = await bus.wait(EmbeddingsCompleted, request_id=request_id)
    assert event.inputs == 3 and event.prompt_tokens == answer.json()["usage"]["prompt_tokens"]
    assert event.client_request_id == "mine-1" and event.pooling == "last" and event.model.name == "tiny"
    assert event.prompt_commitment == commit(input_bytes(TEXTS), salt), "the caller can check the receipt's inputs"
    vectors = b"".join(base64.b64decode(d["embedding"]) for d in answer.json()["data"])
    assert event.output_sha256 == hashlib.sha256(vectors).hexdigest(), "and the vectors it got"
    assert salt not in json.dumps(event.model_dump(mode="json"))


async def _refusals(gateway, engine: LLMEngine) -> None:
    client = gateway.client()
    hidden = engine.model_config.hidden_size
    cases = [
        (dict(model="tiny", input=""), 400, "invalid_value", "input"),
        (dict(model="tiny", input=[]), 400, "invalid_value", "input"),
        (dict(model="tiny", input=["a", ""]), 400, "invalid_value", "input"),
        (dict(model="tiny", input=["a"] * 2049), 400, "invalid_value", "input"),
        (dict(model="tiny", input=[[5] * (CONTEXT + 1)]), 400, "context_length_exceeded", "input"),
        (dict(model="tiny", input="a", dimensions=hidden + 1), 400, "invalid_value", None),
        (dict(model="absent", input="a"), 404, "model_not_found", "model"),
        (dict(model="tiny:x", input="a"), 400, "invalid_value", "model"),
        (dict(model="tiny:7", input="a"), 404, "model_not_found", "model"),
        (dict(model="tiny", input="a", encoding_format="int8"), 400, "invalid_value", "encoding_format"),
        (dict(model="tiny", input=[[1, 10**6]]), 400, "invalid_value", None),
    ]
    for body, status, code, param in cases:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.embeddings.create(**body)
        err = refused.value
        assert err.status_code == status, (body, err)
        assert err.body["code"] == code and err.body["type"] == "invalid_request_error", (body, err.body)
        if param:
            assert err.body["param"] == param, (body, err.body)
    with pytest.raises(openai.BadRequestError) as long:
        await client.embeddings.create(model="tiny", input=["ok", "x " * (CONTEXT + 10)])
    assert "maximum context length is 256" in long.value.body["message"] and "input 1" in long.value.body["message"]
    full = await client.embeddings.create(model="tiny", input=[[5] * CONTEXT])
    assert full.usage.prompt_tokens == CONTEXT, "an input may fill the whole context"
    with pytest.raises(openai.BadRequestError) as extra:
        await client.embeddings.create(model="tiny", input="a", extra_body={"pooling": "mean"})
    assert "unrecognized request argument supplied: pooling" in extra.value.body["message"]


async def test_a_deploys_embedding_pooling_overrides_the_checkpoints(nats_server, tmp_path, ckpts, capsys):  # noqa: F811
    """Deployed with embedding_pooling "mean" (strata deploy --embedding-pooling mean), the worker pools
    over the prompt's tokens although the checkpoint says nothing (its default: the last token)."""
    from shared.embeddings import EmbeddingRequest, embed

    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    try:
        async with worker.running():
            await deployed(bus, "other", embedding_pooling="mean")
            engine = LLMEngine.from_pretrained(
                ckpts["other"], EngineConfig(device="cpu", dtype="float32", num_blocks=64)
            )
            got = await embed(bus.nc, EmbeddingRequest(model="other", inputs=TEXTS))
            assert got.reply.pooling == "mean" and engine.pooling == "last"
            vectors = np.array([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in got.vectors])
            np.testing.assert_allclose(vectors, engine.embed(TEXTS, pooling="mean").vectors.numpy(), atol=1e-5)
            assert not np.allclose(vectors, engine.embed(TEXTS).vectors.numpy(), atol=1e-3)
            # the same over `strata embed` (the CLI has its own event loop: a thread)
            code = await asyncio.to_thread(cli_main, ["embed", "other", *TEXTS, "--nats-url", nats_server.url])
            out, err = capsys.readouterr()
            assert code == 0 and "other:1, mean pooling, 64 dimensions" in err
            lines = [json.loads(line) for line in out.splitlines()]
            assert [line["index"] for line in lines] == [0, 1, 2]
            np.testing.assert_allclose([line["embedding"] for line in lines], vectors, atol=1e-6)
            assert await asyncio.to_thread(cli_main, ["embed", "absent", "x", "--nats-url", nats_server.url]) == 1
            assert "'absent' is not deployed" in capsys.readouterr().err
    finally:
        await bus.nc.close()


async def test_a_token_quota_reserves_the_inputs_bound_and_is_charged_what_was_embedded(nats_server, tmp_path, ckpts):  # noqa: F811
    """An input of 44 bytes reserves 52 tokens of a 100-token key and uses fewer: only the refund at its
    end lets the next request in; a request over what is left is refused 429 with Retry-After."""
    from tests.api_gateway.test_quotas import make_key

    async with stack(nats_server, tmp_path, ckpts) as (gateway, engine):
        client = gateway.client(api_key=await make_key(nats_server.url, tokens_per_minute=100))
        text = "The quick brown fox jumps over the lazy dog."  # a line the test tokenizer was trained on
        used, bound = len(engine.tokenizer.encode(text)), len(text.encode()) + 8
        assert bound == 52 and used < 100 - bound
        served = 0
        while 100 - served >= bound:  # each reservation fits only because the earlier ones were refunded
            reply = await client.embeddings.create(model="tiny", input=text)
            assert reply.usage.prompt_tokens == used
            served += used
        assert served >= 2 * used, "more requests than the bound alone would admit"
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model="tiny", input=[text, text])
        assert int(refused.value.response.headers["retry-after"]) >= 1


async def test_an_embedding_only_checkpoint_deploys_embeds_and_refuses_to_generate(
    nats_server,
    tmp_path,
    ckpts,  # noqa: F811
    tokenizer_dir,
):  # noqa: F811
    """A Qwen3-Embedding-style checkpoint whose files have no LM head: it loads (warmed up by an embedding),
    answers /v1/embeddings as the engine computes them, and a chat request to it is a clear 400."""
    from tests.engine.test_embeddings import bare_decoder_checkpoint

    path = bare_decoder_checkpoint(tmp_path / "bare", tokenizer_dir, tied=False)
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", {**ckpts, "embedder": path})
    try:
        async with worker.running():
            await deployed(bus, "embedder")
            with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
                client = gateway.client()
                got = await client.embeddings.create(model="embedder", input=TEXTS)
                engine = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_blocks=32))
                np.testing.assert_allclose(
                    [d.embedding for d in got.data], engine.embed(TEXTS).vectors.numpy(), atol=1e-5
                )
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(model="embedder", messages=[{"role": "user", "content": "hi"}])
                assert (
                    "embedding model" in refused.value.body["message"]
                    and "/v1/embeddings" in refused.value.body["message"]
                )
    finally:
        await bus.nc.close()
