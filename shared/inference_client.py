"""The client side of the serving contract (shared/inference.py), written once for every caller: the
api-gateway, the ``strata chat``/``strata complete`` CLI and tests.

- ``stream(nc, request)`` yields ``Started``, ``Chunk``s and a final ``End``; it raises a typed
  ``shared.errors`` exception for a worker's error reply, ``NotFound`` at once when no worker hosts
  the model, and ``WorkerLost`` when the worker falls silent for ``SILENCE_TIMEOUT_S`` (it died). If
  the consumer stops early (closed, cancelled, client gone) it publishes an ``InferenceCancel``.
- ``complete(nc, request)`` is the same exchange gathered into one ``InferenceReply``. It rides the
  streaming protocol on purpose: keepalives let it notice a dead worker in seconds, where a single
  request-reply could only wait for its full time-out.
- ``deployed_models(nc)`` asks every worker which models it has loaded.

The OpenTelemetry context of the caller travels in the NATS headers, so the worker continues the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import propagate
from pydantic import BaseModel, TypeAdapter, ValidationError

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
    LoadedModels,
    LoadedModelsRequest,
    Started,
    StreamFailure,
    StreamMessage,
    TokenLogprob,
)
from shared.rpc import RpcReply

log = logging.getLogger(__name__)
MODELS_SUBJECT = subjects.rpc("inference-worker", "models")
_NO_RESPONDERS = "503"
_stream_message: TypeAdapter[Any] = TypeAdapter(StreamMessage)
_background: set[asyncio.Task[None]] = set()  # cancel publishes outlive a cancelled caller


class WorkerLost(errors.StrataError):
    """The worker stopped talking in the middle of a request (it died or lost its connection)."""

    code, http_status = "worker_lost", 502


class DeadlineExceeded(errors.StrataError):
    """The whole request took longer than the caller allowed."""

    code, http_status = "timeout", 504


def request_subject(request: InferenceRequest) -> str:
    """``infer.request.<model name>``: versions and aliases are resolved by the worker, so the
    subject carries only the name."""
    return subjects.inference_request(parse_ref(request.model).name)


def trace_headers() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


async def stream(
    nc: Client, request: InferenceRequest, *, silence_timeout_s: float = SILENCE_TIMEOUT_S,
    deadline_s: float | None = None,
) -> AsyncIterator[Started | Chunk | End]:
    """Send ``request`` (as a streaming request) and yield what the worker sends, keepalives aside."""
    request = request.model_copy(update={"stream": True})
    subject = request_subject(request)
    if not nc.is_connected:  # reconnecting: a request would sit in a buffer, then time out as a "dead worker"
        raise errors.Unavailable("NATS is not reachable (the connection is down or reconnecting)")
    inbox = nc.new_inbox()
    try:
        sub = await nc.subscribe(inbox)
    except NatsError as exc:
        raise errors.Unavailable(f"NATS is not reachable: {type(exc).__name__}") from None
    finished = False
    started = time.monotonic()
    try:
        try:
            await nc.publish(subject, request.model_dump_json().encode(), reply=inbox, headers=trace_headers())
        except NatsError as exc:
            finished = True  # nothing was sent: nothing to cancel
            raise errors.Unavailable(f"NATS is not reachable: {type(exc).__name__}") from None
        while True:
            wait = silence_timeout_s
            if deadline_s is not None:
                left = deadline_s - (time.monotonic() - started)
                if left <= 0:
                    raise DeadlineExceeded(f"request {request.request_id} took longer than {deadline_s}s")
                wait = min(wait, left)
            try:
                msg = await sub.next_msg(timeout=wait)
            except NatsTimeout:
                if deadline_s is not None and time.monotonic() - started >= deadline_s:
                    raise DeadlineExceeded(f"request {request.request_id} took longer than {deadline_s}s") from None
                raise WorkerLost(
                    f"the worker serving {request.model!r} fell silent for {silence_timeout_s}s "
                    f"(request {request.request_id}); it probably died"
                ) from None
            if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
                finished = True
                raise errors.NotFound(f"model {parse_ref(request.model).name!r} is not deployed (no worker serves it)")
            try:
                message = _stream_message.validate_json(msg.data)
            except ValidationError as exc:
                log.warning("ignoring a malformed stream message for %s: %s", request.request_id, exc.errors()[0]["msg"])
                continue
            if isinstance(message, Keepalive):
                continue
            if isinstance(message, StreamFailure):
                finished = True
                raise errors.from_code(message.error.code, message.error.message)
            if message.request_id != request.request_id:
                continue
            if isinstance(message, End):
                finished = True
            yield message
            if finished:
                return
    finally:
        # No awaits that a cancellation could interrupt here: the clean-up runs as its own task.
        _spawn(_close(nc, sub, None if finished else InferenceCancel(request_id=request.request_id)))


async def complete(nc: Client, request: InferenceRequest, *, silence_timeout_s: float = SILENCE_TIMEOUT_S,
                   deadline_s: float | None = None) -> InferenceReply:
    """Send ``request`` and return the whole answer (see the module docstring for why it streams)."""
    model: ModelId | None = None
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    want_logprobs = request.sampling.logprobs is not None
    async for message in stream(nc, request, silence_timeout_s=silence_timeout_s, deadline_s=deadline_s):
        if isinstance(message, Started):
            model = message.model
        elif isinstance(message, Chunk):
            texts.append(message.text)
            logprobs.extend(message.logprobs or [])
        else:
            if model is None:
                raise WorkerLost(f"the worker ended request {request.request_id} without saying which model answered")
            return InferenceReply(
                request_id=request.request_id, model=model, text="".join(texts), finish_reason=message.finish_reason,
                usage=message.usage, logprobs=logprobs if want_logprobs else None,
            )
    raise WorkerLost(f"the stream of request {request.request_id} ended without an end marker")


async def cancel(nc: Client, request_id: str, reason: str = "cancelled by the client") -> None:
    await nc.publish(CANCEL_SUBJECT, InferenceCancel(request_id=request_id, reason=reason).model_dump_json().encode())


class DeployedModel(BaseModel):
    """One model that at least one worker has loaded, with how many workers host it."""

    name: str
    versions: list[ModelId]
    replicas: int


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
        _spawn(_close(nc, sub, None))
    by_name: dict[str, DeployedModel] = {}
    for raw in replies:
        for model in _loaded(raw):
            entry = by_name.setdefault(model.name, DeployedModel(name=model.name, versions=[], replicas=0))
            entry.replicas += 1
            if model not in entry.versions:
                entry.versions.append(model)
    return sorted(by_name.values(), key=lambda m: m.name)


def _loaded(raw: bytes) -> list[ModelId]:
    """The models one worker serves (its ready deployments); a malformed reply counts as none."""
    try:
        reply = RpcReply.model_validate_json(raw)
        if not reply.ok:
            return []
        loaded = LoadedModels.model_validate(reply.result)
    except ValidationError:
        log.warning("ignoring a malformed %s reply", MODELS_SUBJECT)
        return []
    return [d.model for d in loaded.deployments if d.state == "ready"]


async def settle(timeout_s: float = 2.0) -> None:
    """Wait (briefly) for pending clean-ups, such as a cancelled stream's InferenceCancel, to go out."""
    pending = {t for t in _background if not t.done()}
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


async def _close(nc: Client, sub: Any, cancel_message: InferenceCancel | None) -> None:
    with contextlib.suppress(Exception):
        if cancel_message is not None and nc.is_connected:
            await nc.publish(CANCEL_SUBJECT, cancel_message.model_dump_json().encode())
            await nc.flush(timeout=2)
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
