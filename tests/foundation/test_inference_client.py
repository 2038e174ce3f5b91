"""The client side of the serving contract (shared/inference_client.py) against a real nats-server:
one wildcard reply subscription per connection shared by every request in flight, late replies
dropped, ``complete()`` as keepalives + one ``RpcReply``, its failure paths, and the cancel a caller
that leaves early publishes. The responders are small nats-py subscribers written here, or the
scripted fake worker (tests/support/fake_worker.py)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import errors, subjects
from shared.events import ModelId
from shared.inference import (
    CANCEL_SUBJECT,
    Chunk,
    End,
    InferenceCancel,
    InferenceReply,
    InferenceRequest,
    Keepalive,
    Started,
    Usage,
)
from shared.inference_client import DeadlineExceeded, WorkerLost, _inboxes, complete, settle, stream
from shared.rpc import ErrorBody, RpcReply
from tests.support.fake_worker import FakeWorker, Script
from tests.support.helpers import eventually, flushed

MODEL = ModelId(name="echo", version=1, digest="sha256:" + "cd" * 32)
Handler = Callable[[Client, Msg, InferenceRequest], Awaitable[None]]


class Caller:
    """A caller's connection that keeps every asynchronous error nats-py reports (an exception in the
    inbox's delivery callback lands here), so a test can assert that a dropped reply raised nothing."""

    def __init__(self) -> None:
        self.nc: Client | None = None
        self.async_errors: list[Exception] = []

    async def connect(self, url: str) -> Client:
        async def on_error(exc: Exception) -> None:
            self.async_errors.append(exc)

        self.nc = await nats.connect(url, error_cb=on_error)
        return self.nc


@pytest.fixture
async def caller(nats_server):
    client = Caller()
    await client.connect(nats_server.url)
    yield client
    assert client.nc is not None
    await client.nc.close()


@pytest.fixture
async def responder_nc(nats_server):
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def serve(nc: Client, handler: Handler, caller: Caller, model: str = "echo") -> None:
    """Answer ``infer.request.<model>`` with ``handler`` (one task per request, as a worker does)."""
    tasks: set[asyncio.Task[None]] = set()

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(handler(nc, msg, InferenceRequest.model_validate_json(msg.data)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subjects.inference_request(model), queue=f"model:{model}", cb=on_request)
    await flushed(nc)
    await heard_by(caller)


async def heard_by(caller: Caller) -> None:
    """A round trip on the caller's connection after a responder subscribed. Without it, a request
    published within milliseconds of that SUB (+ its flush) on a connection that was opened before it
    sometimes gets a no-responders status: seen here with nats-server 2.15.1 and nats-py 2.16 in about
    1 of 100 tries of a bare ``nc.request`` too, so it is the server's, not shared/inference_client.py's."""
    assert caller.nc is not None
    await flushed(caller.nc)


def reply_for(request: InferenceRequest, text: str | None = None) -> bytes:
    answer = InferenceReply(request_id=request.request_id, model=MODEL, text=request.prompt if text is None else text,
                            finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))
    return RpcReply(ok=True, result=answer.model_dump(mode="json")).model_dump_json().encode()


def ask(prompt: str, model: str = "echo") -> InferenceRequest:
    return InferenceRequest(model=model, prompt=prompt)


async def echo(nc: Client, msg: Msg, request: InferenceRequest) -> None:
    """Echo the prompt back after a random short pause, so that the replies of concurrent requests
    arrive interleaved and out of order."""
    await asyncio.sleep(random.uniform(0, 0.05))
    if not request.stream:
        await nc.publish(msg.reply, Keepalive(request_id=request.request_id).model_dump_json().encode())
        await nc.publish(msg.reply, reply_for(request))
        return
    rid = request.request_id
    for message in (
        Started(request_id=rid, model=MODEL),
        Chunk(request_id=rid, index=0, text=request.prompt or ""),
        Keepalive(request_id=rid),
        End(request_id=rid, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1)),
    ):
        await nc.publish(msg.reply, message.model_dump_json().encode())
        await asyncio.sleep(random.uniform(0, 0.01))


async def streamed_text(nc: Client, request: InferenceRequest) -> tuple[str, str]:
    text, request_ids = [], set()
    async for message in stream(nc, request):
        request_ids.add(message.request_id)
        if isinstance(message, Chunk):
            text.append(message.text)
    assert request_ids == {request.request_id}
    return request.request_id, "".join(text)


# ---- (a) many requests, one subscription ---------------------------------------------------------


async def test_concurrent_completes_and_streams_share_one_reply_subscription_and_each_get_their_own_answer(
    caller, responder_nc
):
    await serve(responder_nc, echo, caller)
    nc = caller.nc
    # nats-server's monitoring endpoint would show the connection's subscriptions, but the nats_server
    # fixture starts it without one (--http_port), so the client's own table of subscriptions is read
    # instead: nc._subs (sid -> Subscription) is exactly what nats-py has SUBscribed on the server.
    assert len(nc._subs) == 0
    seen: list[int] = []
    sampling = asyncio.Event()

    async def sample() -> None:
        while not sampling.is_set():
            seen.append(len(nc._subs))
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    completes = [ask(f"complete {i}") for i in range(50)]
    streams = [ask(f"stream {i}") for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(complete(nc, r) for r in completes), *(streamed_text(nc, r) for r in streams)), 30
    )
    sampling.set()
    await sampler

    replies, streamed = results[:50], results[50:]
    assert [(r.request_id, r.text) for r in replies] == [(r.request_id, r.prompt) for r in completes]
    assert list(streamed) == [(r.request_id, r.prompt) for r in streams]
    assert len(nc._subs) == 1
    assert seen and set(seen) <= {0, 1} and seen[-1] == 1  # 0 only before the first request subscribed
    inbox = _inboxes[nc]
    (sub,) = nc._subs.values()
    assert sub.subject == f"{inbox._prefix}.*"
    assert inbox._waiting == {}  # no per-request state left behind
    assert caller.async_errors == []


# ---- (b) a reply to a request that is over ----------------------------------------------------


async def test_a_second_reply_to_a_finished_request_is_dropped_and_reaches_no_later_request(caller, responder_nc):
    first_reply_to: list[str] = []

    async def answers_twice(nc: Client, msg: Msg, request: InferenceRequest) -> None:
        if request.prompt == "first":
            first_reply_to.append(msg.reply)
            await nc.publish(msg.reply, reply_for(request))
            return
        # the stale duplicate goes out on the same connection just before the later request's answer:
        # NATS keeps one publisher's order, so the caller's inbox handles it before that answer
        stale = ask("first").model_copy(update={"request_id": request.request_id})
        await nc.publish(first_reply_to[0], reply_for(stale, text="stale duplicate"))
        await nc.publish(msg.reply, reply_for(request))

    await serve(responder_nc, answers_twice, caller)
    nc = caller.nc
    first = await complete(nc, ask("first"))
    assert first.text == "first"
    later = ask("later")
    answer = await complete(nc, later)
    assert (answer.request_id, answer.text) == (later.request_id, "later")
    assert _inboxes[nc]._waiting == {}
    assert caller.async_errors == []


async def test_a_reply_after_the_callers_deadline_is_dropped_and_reaches_no_later_request(caller, responder_nc):
    held: list[tuple[Msg, InferenceRequest]] = []

    async def answers_late(nc: Client, msg: Msg, request: InferenceRequest) -> None:
        if request.prompt == "slow":
            held.append((msg, request))  # answered only when the next request comes, long after the deadline
            return
        late_msg, late_request = held[0]
        await nc.publish(late_msg.reply, reply_for(late_request, text="too late"))
        await nc.publish(msg.reply, reply_for(request))

    await serve(responder_nc, answers_late, caller)
    nc = caller.nc
    with pytest.raises(DeadlineExceeded):
        await complete(nc, ask("slow"), deadline_s=0.3)
    later = ask("later")
    answer = await complete(nc, later)
    assert (answer.request_id, answer.text) == (later.request_id, "later")
    assert _inboxes[nc]._waiting == {}
    assert caller.async_errors == []


# ---- (c) complete(): keepalives, silence, typed errors, malformed messages, no responder ---------


@pytest.fixture
async def fake_worker(nats_server, caller):
    worker = await FakeWorker(
        nats_server.url,
        {
            "patient": Script(tokens=["a", "b", "c", "d", "e"], delay_s=0.5, keepalive_s=0.25),  # 2.5 s, keepalives
            "silent": Script(delay_s=0.3, die_after=0),  # takes the request, then never says a word
            "fading": Script(delay_s=0.5, keepalive_s=0.25, die_after=2),  # keepalives for 1 s, then silence
            "overloaded": Script(overloaded=True),
        },
    ).start()
    await heard_by(caller)
    yield worker
    await worker.stop()


async def test_complete_outlives_its_silence_time_out_while_keepalives_come(caller, fake_worker):
    started = time.monotonic()
    answer = await complete(caller.nc, ask("take your time", model="patient"), silence_timeout_s=1.0)
    assert answer.text == "abcde" and answer.finish_reason == "stop"
    assert time.monotonic() - started >= 2.0  # the answer took longer than the silence time-out, twice
    sent = fake_worker.requests[-1]
    assert (sent.stream, sent.keepalive) == (False, True)
    await settle()
    assert fake_worker.cancels == []  # a call that got its answer cancels nothing


@pytest.mark.parametrize("model, lower_bound_s", [("silent", 1.0), ("fading", 2.0)])
async def test_complete_fails_with_worker_lost_when_the_worker_falls_silent(caller, fake_worker, model, lower_bound_s):
    started = time.monotonic()
    with pytest.raises(WorkerLost, match="fell silent for 1.0s"):
        await complete(caller.nc, ask("hello?", model=model), silence_timeout_s=1.0, deadline_s=30)
    elapsed = time.monotonic() - started
    # about silence_timeout_s after the last word; the upper bound only says "long before the deadline"
    assert lower_bound_s * 0.9 <= elapsed < 15
    assert _inboxes[caller.nc]._waiting == {}


async def test_complete_raises_unavailable_for_an_overloaded_workers_error_reply(caller, fake_worker):
    with pytest.raises(errors.Unavailable, match="queue is full"):
        await complete(caller.nc, ask("hi", model="overloaded"))


@pytest.mark.parametrize(
    "body, raised, message",
    [
        (RpcReply(ok=False, error=ErrorBody(code="unavailable", message="draining")), errors.Unavailable, "draining"),
        (RpcReply(ok=False, error=ErrorBody(code="invalid", message="bad sampling")), errors.Invalid, "bad sampling"),
        (RpcReply(ok=False), errors.StrataError, "without saying why"),
        (RpcReply(ok=True, result={"text": "no model, no usage"}), WorkerLost, "malformed"),
    ],
)
async def test_complete_raises_the_typed_error_of_a_failed_or_broken_reply(caller, responder_nc, body, raised, message):
    async def answer(nc: Client, msg: Msg, request: InferenceRequest) -> None:
        await nc.publish(msg.reply, body.model_dump_json().encode())

    await serve(responder_nc, answer, caller)
    with pytest.raises(raised, match=message) as info:
        await complete(caller.nc, ask("hi"))
    assert type(info.value) is raised
    await settle()
    assert _inboxes[caller.nc]._waiting == {}


async def test_complete_ignores_malformed_messages_and_takes_the_next_valid_reply(caller, responder_nc):
    async def noisy(nc: Client, msg: Msg, request: InferenceRequest) -> None:
        for junk in (b"not json", b"", b'{"ok": "maybe"}', b'{"kind": "chunk"}', b"[1, 2]"):
            await nc.publish(msg.reply, junk)
        await nc.publish(msg.reply, Keepalive(request_id=request.request_id).model_dump_json().encode())
        await nc.publish(msg.reply, reply_for(request))
        await nc.publish(msg.reply, reply_for(request, text="a second valid reply: too late, dropped"))

    await serve(responder_nc, noisy, caller)
    request = ask("through the noise")
    answer = await complete(caller.nc, request)
    assert (answer.request_id, answer.text) == (request.request_id, "through the noise")
    assert caller.async_errors == []


async def test_complete_without_a_responder_raises_not_found_at_once_and_cancels_nothing(caller, nats_server):
    cancels: list[bytes] = []
    spy = await nats.connect(nats_server.url)
    try:

        async def on_cancel(msg: Msg) -> None:
            cancels.append(msg.data)

        await spy.subscribe(CANCEL_SUBJECT, cb=on_cancel)
        await flushed(spy)
        started = time.monotonic()
        with pytest.raises(errors.NotFound, match="'nobody' is not deployed"):
            await complete(caller.nc, ask("anyone?", model="nobody"), silence_timeout_s=30)
        assert time.monotonic() - started < 10  # no-responders status at once, not the 30 s silence time-out
        await settle()
        await flushed(caller.nc)
        await flushed(spy)
        assert cancels == []
    finally:
        await spy.close()


# ---- (d) leaving early -------------------------------------------------------------------------


async def test_cancelling_a_complete_publishes_one_inference_cancel_with_its_request_id(
    caller, fake_worker, nats_server
):
    cancels: list[InferenceCancel] = []
    spy = await nats.connect(nats_server.url)
    try:

        async def on_cancel(msg: Msg) -> None:
            cancels.append(InferenceCancel.model_validate_json(msg.data))

        await spy.subscribe(CANCEL_SUBJECT, cb=on_cancel)
        await flushed(spy)
        request = ask("never mind", model="patient")
        task = asyncio.create_task(complete(caller.nc, request))
        await eventually(lambda: fake_worker.requests, 10, "the worker to receive the request")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle()
        await eventually(lambda: cancels, 10, "an InferenceCancel on infer.cancel")
        await eventually(lambda: fake_worker.cancels, 10, "the worker to hear the cancel")
        # the worker answers the cancelled request ("cancelled"): once it has, and that reply has come
        # through nats-server (two flushes), the caller's inbox has been handed it, after the call was over
        await eventually(lambda: not fake_worker._tasks, 10, "the worker to answer the cancelled request")
        assert fake_worker.nc is not None
        await flushed(fake_worker.nc)
        await flushed(caller.nc)
        await flushed(spy)
        await asyncio.sleep(0.1)
        assert [c.request_id for c in cancels] == [request.request_id]
        assert [c.request_id for c in fake_worker.cancels] == [request.request_id]
        assert _inboxes[caller.nc]._waiting == {}
        assert caller.async_errors == []  # that reply was dropped without an error
    finally:
        await spy.close()
