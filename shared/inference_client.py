"""The client side of the serving contract (shared/inference.py), written once for every caller: the
api-gateway, the ``strata chat``/``strata complete`` CLI and tests.

- ``stream(nc, request)`` yields ``Started``, ``Chunk``s and a final ``End``; it raises a typed
  ``shared.errors`` exception for a worker's error reply, ``NotFound`` at once when no worker hosts
  the model, and ``WorkerLost`` when the worker falls silent for ``SILENCE_TIMEOUT_S`` (it died). If
  the consumer stops early (closed, cancelled, client gone) it publishes an ``InferenceCancel``.
- ``complete(nc, request)`` returns one ``InferenceReply``. It asks the worker for keepalives before
  the reply (``keepalive: true``), so it notices a dead worker in seconds, where a plain
  request-reply could only wait for its full time-out; the answer itself is one message, not the
  three of a stream (started, chunk, end).

Every request's replies arrive on one wildcard subscription per connection (``_Inbox``).
- ``deployed_models(nc)`` asks every worker which models it has loaded.

The OpenTelemetry context of the caller travels in the NATS headers, so the worker continues the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import propagate
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from shared import errors, subjects
from shared.catalog import parse_ref
from shared.events import ModelId
from shared.inference import (
    CANCEL_SUBJECT,
    SILENCE_TIMEOUT_S,
    Chunk,
    End,
    InferenceCancel,
    InferenceReply,
    InferenceRequest,
    Keepalive,
    LoadedDeployment,
    LoadedModels,
    LoadedModelsRequest,
    Started,
    StreamFailure,
    StreamMessage,
)
from shared.rpc import ErrorBody, RpcReply

log = logging.getLogger(__name__)
T = TypeVar("T")
MODELS_SUBJECT = subjects.rpc("inference-worker", "models")
_NO_RESPONDERS = "503"
_stream_message: TypeAdapter[Any] = TypeAdapter(StreamMessage)
CANCEL_FLUSH_S = 5.0  # how long a cancel may take to reach nats-server on a busy machine (see settle)
_background: set[asyncio.Task[None]] = set()  # cancel publishes outlive a cancelled caller


class WorkerLost(errors.StrataError):
    """The worker stopped talking in the middle of a request (it died or lost its connection)."""

    code, http_status = "worker_lost", 502


class DeadlineExceeded(errors.StrataError):
    """The whole request took longer than the caller allowed."""

    code, http_status = "timeout", 504


def request_subject(request: InferenceRequest) -> str:
    """``infer.request.<model name>``: versions and aliases are resolved by the worker, so the
    subject carries only the name. A request that names the API key that asked goes on the model's
    attributed subject, which only the api-gateway may publish to (subjects.ATTRIBUTED)."""
    return subjects.inference_request(parse_ref(request.model).name, attributed=request.attributed)


def trace_headers() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class _Inbox:
    """One wildcard subscription per connection for the replies to every request, as nats-py's own
    ``request()`` does: a SUB and an UNSUB per request cost the gateway and nats-server more CPU
    than the replies themselves. A reply for a request that is over is dropped."""

    def __init__(self, nc: Client) -> None:
        self._nc, self._prefix = nc, nc.new_inbox()
        self._waiting: dict[str, asyncio.Queue[Msg]] = {}
        self._subscribed = False
        self._subscribing = asyncio.Lock()
        self._tokens = itertools.count()

    async def open(self) -> tuple[str, asyncio.Queue[Msg]]:
        """A fresh reply subject and the queue its messages arrive in."""
        if not self._subscribed:
            async with self._subscribing:
                if not self._subscribed:
                    await self._nc.subscribe(f"{self._prefix}.*", cb=self._deliver)
                    self._subscribed = True
        token = str(next(self._tokens))
        self._waiting[token] = queue = asyncio.Queue()
        return f"{self._prefix}.{token}", queue

    def close(self, reply_subject: str) -> None:
        self._waiting.pop(reply_subject.rpartition(".")[2], None)

    async def _deliver(self, msg: Msg) -> None:
        if (queue := self._waiting.get(msg.subject.rpartition(".")[2])) is not None:
            queue.put_nowait(msg)


_inboxes: weakref.WeakKeyDictionary[Client, _Inbox] = weakref.WeakKeyDictionary()


class _Call:
    """One request in flight: its reply subject, its time-outs, and its clean-up. Whoever reads
    the final reply sets ``finished``; a call left before that publishes an ``InferenceCancel``."""

    def __init__(self, nc: Client, request: InferenceRequest, silence_timeout_s: float, deadline_s: float | None,
                 subject: str | None = None) -> None:
        self.nc, self.request, self.finished = nc, request, False
        self._subject = subject or request_subject(request)  # another contract's subject (shared/embeddings.py)
        self._silence_s, self._deadline_s = silence_timeout_s, deadline_s
        self._started = time.monotonic()

    async def __aenter__(self) -> _Call:
        if not self.nc.is_connected:  # reconnecting: a request would sit in a buffer, then time out as a "dead worker"
            raise errors.Unavailable("NATS is not reachable (the connection is down or reconnecting)")
        inbox = _inboxes.get(self.nc) or _inboxes.setdefault(self.nc, _Inbox(self.nc))
        try:
            self._reply_to, self._queue = await inbox.open()
        except NatsError as exc:
            raise errors.Unavailable(f"NATS is not reachable: {type(exc).__name__}") from None
        self._inbox = inbox
        try:
            await self.nc.publish(self._subject, self.request.model_dump_json().encode(),
                                  reply=self._reply_to, headers=trace_headers())
        except NatsError as exc:
            inbox.close(self._reply_to)  # nothing was sent: nothing to cancel
            raise errors.Unavailable(f"NATS is not reachable: {type(exc).__name__}") from None
        return self

    async def __aexit__(self, *_exc: object) -> None:
        # No awaits that a cancellation could interrupt here: the cancel goes out as its own task.
        self._inbox.close(self._reply_to)
        if not self.finished:
            _spawn(_send_cancel(self.nc, InferenceCancel(request_id=self.request.request_id)))

    async def next(self) -> bytes:
        """The body of the worker's next message (keepalives included: they prove it is alive)."""
        request, wait = self.request, self._silence_s
        if self._deadline_s is not None:
            left = self._deadline_s - (time.monotonic() - self._started)
            if left <= 0:
                raise DeadlineExceeded(f"request {request.request_id} took longer than {self._deadline_s}s")
            wait = min(wait, left)
        try:
            async with asyncio.timeout(wait):
                msg = await self._queue.get()
        except TimeoutError:
            if self._deadline_s is not None and time.monotonic() - self._started >= self._deadline_s:
                raise DeadlineExceeded(f"request {request.request_id} took longer than {self._deadline_s}s") from None
            raise WorkerLost(f"the worker serving {request.model!r} fell silent for {self._silence_s}s "
                             f"(request {request.request_id}); it probably died") from None
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
            self.finished = True
            raise errors.NotFound(f"model {parse_ref(request.model).name!r} is not deployed (no worker serves it)")
        return msg.data

    async def parsed(self, parse: Callable[[bytes], T], expected: Callable[[bytes], bool] = lambda _data: False) -> T:
        """The next message ``parse`` accepts; one it rejects is skipped, with a warning unless
        ``expected`` says such messages come (a keepalive before a non-stream reply)."""
        while True:
            data = await self.next()
            try:
                return parse(data)
            except ValidationError as exc:
                if not expected(data):
                    log.warning(
                        "ignoring a malformed message for %s: %s", self.request.request_id, exc.errors()[0]["msg"]
                    )


async def stream(
    nc: Client,
    request: InferenceRequest,
    *,
    silence_timeout_s: float = SILENCE_TIMEOUT_S,
    deadline_s: float | None = None,
) -> AsyncIterator[Started | Chunk | End]:
    """Send ``request`` (as a streaming request) and yield what the worker sends, keepalives aside."""
    request = request.model_copy(update={"stream": True, "keepalive": False})
    async with _Call(nc, request, silence_timeout_s, deadline_s) as call:
        while True:
            message = await call.parsed(_stream_message.validate_json)
            if isinstance(message, Keepalive):
                continue
            if isinstance(message, StreamFailure):
                call.finished = True
                raise errors.from_code(message.error.code, message.error.message)
            if message.request_id != request.request_id:
                continue
            if isinstance(message, End):
                call.finished = True
            yield message
            if call.finished:
                return


async def complete(
    nc: Client,
    request: InferenceRequest,
    *,
    silence_timeout_s: float = SILENCE_TIMEOUT_S,
    deadline_s: float | None = None,
) -> InferenceReply:
    """Send ``request`` and return the whole answer: one reply message, with keepalives before it
    while the worker is busy, so a dead worker is noticed in seconds rather than at the deadline."""
    request = request.model_copy(update={"stream": False, "keepalive": True})
    async with _Call(nc, request, silence_timeout_s, deadline_s) as call:
        reply = await call.parsed(RpcReply.model_validate_json, expected=is_keepalive)
        call.finished = True
        if not reply.ok:
            error = reply.error or ErrorBody(code="internal", message="the worker failed without saying why")
            raise errors.from_code(error.code, error.message)
        try:
            return InferenceReply.model_validate(reply.result)
        except ValidationError as exc:
            raise WorkerLost(
                f"the worker's reply to {request.request_id} is malformed: {exc.errors()[0]['msg']}"
            ) from None


def is_keepalive(data: bytes) -> bool:
    """Whether a worker's message is a Keepalive (proof of life while a non-stream request waits)."""
    try:
        Keepalive.model_validate_json(data)
    except ValidationError:
        return False
    return True


async def cancel(nc: Client, request_id: str, reason: str = "cancelled by the client") -> None:
    await nc.publish(CANCEL_SUBJECT, InferenceCancel(request_id=request_id, reason=reason).model_dump_json().encode())


class DeployedModel(BaseModel):
    """One model that at least one worker has loaded, with how many workers host it."""

    name: str
    versions: list[ModelId]
    replicas: int
    max_model_len: int | None = Field(
        default=None,
        description=(
            "the smallest context of the replicas that say theirs (any of them may serve a request); None if none says"
        ),
    )


async def deployed_models(nc: Client, *, window_s: float = 0.3, quiet_s: float = 0.05) -> list[DeployedModel]:
    """Ask every worker (no queue group) which models it serves. Replies are gathered for at most
    ``window_s``, and no longer than ``quiet_s`` after the last one once any has come."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[bytes] = []
    try:
        await nc.publish(MODELS_SUBJECT, LoadedModelsRequest().model_dump_json().encode(), reply=inbox)
        loop = asyncio.get_running_loop()
        end = loop.time() + window_s
        while (left := end - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(left, quiet_s) if replies else left)
            except NatsTimeout:
                break
            if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
                break  # no worker at all
            replies.append(msg.data)
    finally:
        _spawn(_unsubscribe(sub))
    by_name: dict[str, DeployedModel] = {}
    for raw in replies:
        for loaded in _loaded(raw):
            model = loaded.model
            entry = by_name.setdefault(model.name, DeployedModel(name=model.name, versions=[], replicas=0))
            entry.replicas += 1
            if model not in entry.versions:
                entry.versions.append(model)
            if loaded.max_model_len is not None:
                entry.max_model_len = min(entry.max_model_len or loaded.max_model_len, loaded.max_model_len)
    return sorted(by_name.values(), key=lambda m: m.name)


def _loaded(raw: bytes) -> list[LoadedDeployment]:
    """The models one worker serves (its ready deployments); a malformed reply counts as none."""
    try:
        reply = RpcReply.model_validate_json(raw)
        if not reply.ok:
            return []
        loaded = LoadedModels.model_validate(reply.result)
    except ValidationError:
        log.warning("ignoring a malformed %s reply", MODELS_SUBJECT)
        return []
    return [d for d in loaded.deployments if d.state == "ready"]


async def settle(timeout_s: float = CANCEL_FLUSH_S + 1) -> None:
    """Wait for pending clean-ups, such as a cancelled stream's InferenceCancel, to go out: it returns as
    soon as they have. The bound only matters when NATS does not answer; a caller that then blocks (the
    chat's input()) would strand a cancel still in nats-py's buffer, so it outlasts the cancel's flush."""
    pending = {t for t in _background if not t.done()}
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


async def _send_cancel(nc: Client, cancel_message: InferenceCancel) -> None:
    with contextlib.suppress(Exception):
        if nc.is_connected:
            await nc.publish(CANCEL_SUBJECT, cancel_message.model_dump_json().encode())
            await nc.flush(timeout=CANCEL_FLUSH_S)


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
