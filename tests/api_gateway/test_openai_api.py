"""The gateway through the official openai client: models, chat, completion, streaming, request ids,
trace propagation. Workers are scripted (tests/support/fake_worker.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.fake_worker import Script
from tests.support.helpers import eventually

pytestmark = pytest.mark.timeout(60)


async def test_models_chat_and_completion(gateway, workers):
    worker = await workers({"tiny": Script(), "other.v2": Script(tokens=["x"])})
    client = gateway.client()

    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["other.v2", "tiny"]
    assert all(m.object == "model" and m.owned_by == "strata" for m in models.data)

    chat = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, seed=7
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "Hello, world!"
    assert chat.choices[0].finish_reason == "stop"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (5, 4, 9)
    assert chat.model == "tiny" and chat.system_fingerprint.startswith("tiny:1/sha256:")
    sent = worker.requests[-1]
    assert sent.messages[0].content == "hi" and sent.sampling.temperature == 0 and sent.sampling.seed == 7

    text = await client.completions.create(
        model="tiny", prompt="Say", max_tokens=2, stop=["\n"], extra_body={"top_k": 5}
    )
    assert text.object == "text_completion"
    assert text.choices[0].text == "Hello,"
    assert text.choices[0].finish_reason == "length"
    sent = worker.requests[-1]
    assert (
        sent.prompt == "Say"
        and sent.sampling.max_tokens == 2
        and sent.sampling.stop == ["\n"]
        and sent.sampling.top_k == 5
    )

    dotted = await client.chat.completions.create(model="other.v2", messages=[{"role": "user", "content": "hi"}])
    assert dotted.choices[0].message.content == "x"


async def test_max_completion_tokens_logprobs_and_content_parts(gateway, workers):
    worker = await workers()
    client = gateway.client()
    chat = await client.chat.completions.create(
        model="tiny",
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=2,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    )
    sent = worker.requests[-1]
    assert sent.sampling.max_tokens == 3 and sent.sampling.logprobs == 2
    assert [(m.role, m.content) for m in sent.messages] == [("system", "be brief"), ("user", "ab")]
    content = chat.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", ",", " world"]
    assert len(content[0].top_logprobs) == 2 and content[0].logprob == -0.5

    text = await client.completions.create(model="tiny", prompt="p", logprobs=1)
    assert text.choices[0].logprobs.tokens == ["Hello", ",", " world", "!"]
    assert text.choices[0].logprobs.text_offset == [0, 5, 6, 12]


async def test_trace_context_travels_and_every_answer_names_its_request(gateway, workers):
    worker = await workers()
    client = gateway.client()
    caller_trace = "0af7651916cd43dd8448eb211c80319c"
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"traceparent": f"00-{caller_trace}-b7ad6b7169203331-01"},
    )
    ours = raw.headers["x-strata-request-id"]
    assert ours and worker.requests[-1].request_id == ours and worker.requests[-1].client_request_id is None
    assert raw.headers["x-request-id"] == ours, "a caller that sent no id of its own gets ours there too"
    assert raw.parse().id == f"chatcmpl-{ours}"
    # the caller's trace travels on in the NATS headers, whether or not this process records spans
    assert worker.headers[-1]["traceparent"].split("-")[1] == caller_trace

    async with httpx.AsyncClient() as http:
        bad = await http.post(
            f"{gateway.v1}/completions", json={"model": "tiny", "prompt": "p"}, headers={"x-request-id": "x" * 200}
        )
        missing = await http.post(
            f"{gateway.v1}/completions", json={"model": "missing", "prompt": "p"}, headers={"x-request-id": "r-404"}
        )
    assert bad.status_code == 400 and "x-request-id" in bad.json()["error"]["message"]
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "r-404"
    assert missing.headers["x-strata-request-id"] not in ("", "r-404")


async def test_the_gateway_makes_the_request_id_and_keeps_the_callers_for_correlation(gateway, workers):
    """Issue #19, finding 7: ``x-request-id: dup-1`` sent twice got two answers under one id, so the
    receipt, the lineage and cancellation could not tell them apart. The caller's id is now only a
    correlation field; the gateway makes the request id, unique per request."""
    worker = await workers()
    client = gateway.client()
    answers = [
        await client.completions.with_raw_response.create(
            model="tiny", prompt="p", extra_headers={"x-request-id": "dup-1"}
        )
        for _ in range(2)
    ]
    sent = [r.request_id for r in worker.requests]
    assert len(set(sent)) == 2 and "dup-1" not in sent, sent
    ours = [a.headers["x-strata-request-id"] for a in answers]
    assert ours == sent
    assert [a.headers["x-request-id"] for a in answers] == ["dup-1", "dup-1"], "the caller's id is echoed"
    assert [a.parse().id for a in answers] == [f"cmpl-{i}" for i in ours]
    assert [(r.request_id, r.client_request_id) for r in worker.requests] == [(i, "dup-1") for i in ours]
    await eventually(lambda: len(worker.completed) == 2, 10, "two inference.completed events")
    assert [(e.request_id, e.client_request_id) for e in worker.completed] == [(i, "dup-1") for i in ours]


async def test_chat_stream_chunks_in_order_with_usage(gateway, workers):
    await workers({"tiny": Script(delay_s=0.01)})
    client = gateway.client()
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert [c.choices[0].delta.content for c in chunks[1:5]] == ["Hello", ",", " world", "!"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.total_tokens == 9


async def test_completion_stream_and_raw_sse(gateway, workers):
    await workers()
    client = gateway.client()
    stream = await client.completions.create(model="tiny", prompt="p", stream=True, max_tokens=3)
    chunks = [c async for c in stream]
    assert [c.choices[0].text for c in chunks] == ["Hello", ",", " world", ""]
    assert chunks[-1].choices[0].finish_reason == "length"

    async with httpx.AsyncClient() as http:
        async with http.stream(
            "POST",
            f"{gateway.v1}/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-request-id"]
            body = (await response.aread()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"stop"' in events[-2]
