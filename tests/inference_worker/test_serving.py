"""Serving over NATS against a real nats-server: replies, streams, batching, cancel, typed errors,
and the inference event of each request."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from pydantic import TypeAdapter

from services.inference_worker.service_layer.worker import Worker
from shared import subjects
from shared.events import InferenceCompleted
from shared.prompt_commitment import commit, prompt_bytes
from shared.inference import CANCEL_SUBJECT, InferenceCancel, InferenceRequest, StreamMessage
from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.inference_worker.conftest import deployed, make_worker, model_id

STREAM = TypeAdapter(StreamMessage)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def reference(ckpts) -> LLMEngine:
    return LLMEngine.from_pretrained(ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=64))


async def stream(bus_client, name: str, on_message=None, **body) -> list:
    """Send a streamed request and collect its messages up to the end or error."""
    req = InferenceRequest(model=name, stream=True, **body)
    inbox = bus_client.nc.new_inbox()
    sub = await bus_client.nc.subscribe(inbox)
    await bus_client.nc.publish(
        subjects.inference_request(name.split(":")[0]), req.model_dump_json().encode(), reply=inbox
    )
    messages = []
    try:
        while True:
            msg = STREAM.validate_json((await sub.next_msg(timeout=20)).data)
            messages.append(msg)
            if on_message is not None:
                await on_message(msg)
            if msg.kind in ("end", "error"):
                return messages
    finally:
        await sub.unsubscribe()


async def test_greedy_reply_equals_the_engines_own_greedy_output(worker, bus_client, reference):
    await deployed(bus_client, "tiny")
    prompt = "Once upon a time there was"
    expected = reference.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    reply = await bus_client.request("tiny", prompt=prompt, sampling={"max_tokens": 8, "temperature": 0})
    assert reply.ok, reply.error
    assert reply.result["text"] == expected.text
    assert reply.result["usage"] == {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 8}
    assert reply.result["finish_reason"] == "length" and reply.result["model"] == model_id("tiny").model_dump()
    # chat goes through the checkpoint's chat template
    messages = [{"role": "user", "content": "Call me Ishmael."}]
    rid = reference.add_request(None, SamplingParams(max_tokens=6, temperature=0), messages=messages)
    chat_expected = _run_until(reference, rid)
    chat = await bus_client.request("tiny", messages=messages, sampling={"max_tokens": 6, "temperature": 0})
    assert chat.ok and chat.result["text"] == chat_expected.text
    # each reply carries the salt of its own prompt commitment, a fresh one per request
    done = await bus_client.wait(InferenceCompleted, request_id=chat.result["request_id"])
    assert done.prompt_commitment == commit(prompt_bytes(messages=messages), chat.result["prompt_salt"])
    assert chat.result["prompt_salt"] != reply.result["prompt_salt"]


def _run_until(engine: LLMEngine, request_id: str):
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                return out


async def test_stream_chunks_end_with_usage_and_the_event_continues_the_trace(worker, bus_client, reference):
    await deployed(bus_client, "tiny")
    prompt = "The quick brown fox"
    expected = reference.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    req = InferenceRequest(model="tiny", stream=True, prompt=prompt, sampling={"max_tokens": 10, "temperature": 0})
    inbox = bus_client.nc.new_inbox()
    sub = await bus_client.nc.subscribe(inbox)
    await bus_client.nc.publish(
        subjects.inference_request("tiny"),
        req.model_dump_json().encode(),
        reply=inbox,
        headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
    )
    messages = []
    while not messages or messages[-1].kind not in ("end", "error"):
        messages.append(STREAM.validate_json((await sub.next_msg(timeout=20)).data))
    kinds = [m.kind for m in messages if m.kind != "keepalive"]
    assert kinds[0] == "started" and kinds[-1] == "end" and set(kinds[1:-1]) == {"chunk"}
    chunks = [m for m in messages if m.kind == "chunk"]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    end = messages[-1]
    assert end.finish_reason == "length" and end.usage.completion_tokens == 10
    assert end.usage.prompt_tokens == len(expected.prompt_token_ids)
    done = await bus_client.wait(InferenceCompleted, request_id=req.request_id)
    assert done.trace_id == TRACE_ID
    assert done.deployment_id == "dep-tiny" and done.node_id == "node-a" and done.device == "cpu"
    assert done.model == model_id("tiny") and done.finish_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (end.usage.prompt_tokens, 10)
    assert done.e2e_seconds >= done.time_to_first_token_seconds >= done.queue_seconds >= 0
    assert done.time_per_output_token_seconds > 0
    # the prompt is committed under a fresh salt that only the requester got (#19): no guess can be checked
    salt = messages[0].prompt_salt
    assert salt and salt not in done.model_dump_json()
    assert done.prompt_commitment == commit(prompt.encode(), salt) != hashlib.sha256(prompt.encode()).hexdigest()
    assert done.output_sha256 == hashlib.sha256(expected.text.encode()).hexdigest()
    assert "text" not in done.model_dump()  # never the text itself


async def test_concurrent_requests_share_engine_steps(worker, bus_client, reference):
    await deployed(bus_client, "tiny")
    n, tokens = 4, 24
    replies = await asyncio.gather(
        *(
            bus_client.request("tiny", prompt=p, sampling={"max_tokens": tokens, "temperature": 0})
            for p in ["It was", "Call me", "The quick", "A paged"][:n]
        )
    )
    assert all(r.ok and r.result["usage"]["completion_tokens"] == tokens for r in replies)
    loop = worker.part(Worker).deployments.by_key["dep-tiny/0"].loop
    assert loop.stats.peak_running > 1
    assert loop.stats.steps < n * tokens  # one step served several requests
    for r, p in zip(replies, ["It was", "Call me", "The quick", "A paged"]):  # batching changes nothing
        assert r.result["text"] == reference.generate([p], SamplingParams(max_tokens=tokens, temperature=0))[0].text


async def test_cancel_mid_stream_frees_the_cache_at_once(worker, bus_client):
    await deployed(bus_client, "tiny")
    engine = worker.part(Worker).deployments.by_key["dep-tiny/0"].loop.engine
    rid = "cancel-me"
    sent = False

    async def cancel_after_first_chunk(msg) -> None:
        nonlocal sent
        if msg.kind == "chunk" and not sent:
            sent = True
            assert engine.cache_usage().used_blocks > 0
            await bus_client.nc.publish(CANCEL_SUBJECT, InferenceCancel(request_id=rid).model_dump_json().encode())

    messages = await stream(
        bus_client,
        "tiny",
        cancel_after_first_chunk,
        request_id=rid,
        prompt="It was",
        sampling={"max_tokens": 240, "temperature": 0},
    )
    end = messages[-1]
    assert end.kind == "end" and end.finish_reason == "cancelled"
    assert end.usage.completion_tokens < 240
    assert engine.cache_usage().used_blocks == 0
    done = await bus_client.wait(InferenceCompleted, request_id=rid)
    assert done.finish_reason == "cancelled"


async def test_typed_errors_never_crash_the_worker(worker, bus_client):
    await deployed(bus_client, "tiny")
    nc = bus_client.nc
    from shared.rpc import RpcReply

    async def raw(body: bytes) -> RpcReply:
        return RpcReply.model_validate_json(
            (await nc.request(subjects.inference_request("tiny"), body, timeout=10)).data
        )

    for body, needle in [
        (b"not json", "invalid InferenceRequest"),
        (b'{"model": "tiny"}', "exactly one"),
        (b'{"model": "tiny", "prompt": "x", "sampling": {"top_p": 7}}', "sampling.top_p"),
        (b'{"model": "other", "prompt": "x"}', "subject"),
    ]:
        reply = await raw(body)
        assert not reply.ok and reply.error.code == "invalid" and needle in reply.error.message, (body, reply)
    pinned = await bus_client.request("tiny:2", prompt="x")
    assert not pinned.ok and pinned.error.code == "not_found" and "tiny:1" in pinned.error.message
    alias = await bus_client.request("tiny@prod", prompt="x")
    assert not alias.ok and alias.error.code == "not_found"
    too_long = await bus_client.request("tiny", prompt="The quick brown fox " * 100)  # context_length is 256
    assert not too_long.ok and too_long.error.code == "context_length_exceeded"
    assert too_long.error.message.startswith(
        "This model's maximum context length is 256 tokens. However, you requested "
    )
    streamed = await stream(bus_client, "tiny", prompt="The quick brown fox " * 100)  # refused before "started"
    assert [m.kind for m in streamed] == ["error"] and streamed[0].error.code == "context_length_exceeded"
    over = await bus_client.request("tiny", prompt="x", sampling={"max_tokens": 256})
    assert (
        not over.ok and over.error.code == "context_length_exceeded" and "256 in the completion" in over.error.message
    )
    capped = await bus_client.request(
        "tiny", prompt="x", sampling={"max_tokens": 256, "cap_max_tokens": True, "temperature": 0}
    )
    assert capped.ok and capped.result["finish_reason"] == "length"
    assert capped.result["usage"]["prompt_tokens"] + capped.result["usage"]["completion_tokens"] == 256
    messages = await stream(bus_client, "tiny:3", prompt="x")
    assert [m.kind for m in messages] == ["error"] and messages[0].error.code == "not_found"
    assert (await bus_client.request("tiny", prompt="x", sampling={"max_tokens": 1})).ok


async def test_overload_answers_unavailable(nats_server, tmp_path, ckpts, bus_client):
    service = make_worker(nats_server.url, tmp_path / "w", ckpts, max_inflight=1)
    async with service.running():
        await deployed(bus_client, "tiny")
        slow = asyncio.ensure_future(
            bus_client.request("tiny", prompt="It was", sampling={"max_tokens": 200, "temperature": 0})
        )
        await asyncio.sleep(0)
        from tests.support.helpers import eventually

        await eventually(lambda: service.part(Worker).server.inflight, 10, "the first request running")
        second = await bus_client.request("tiny", prompt="x", sampling={"max_tokens": 1})
        assert not second.ok and second.error.code == "unavailable" and "retry" in second.error.message
        assert (await slow).ok
