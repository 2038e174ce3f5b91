"""How an inference route answers once its body is read: admitted under the in-flight limit, held to
its key's quotas, named on the request's span (GenAI conventions), then one JSON body or a stream of
server-sent events; a client that hangs up cancels the generation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Literal, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from opentelemetry import trace
from starlette.background import BackgroundTask

from shared import errors
from shared.inference import End, InferenceRequest
from shared.prompt_commitment import SALT_HEADER

from services.api_gateway.domain import render
from services.api_gateway.domain.errors import to_openai
from services.api_gateway.entrypoints.callers import id_headers
from services.api_gateway.service_layer.handlers import Caller, Gateway, Message
from services.api_gateway.service_layer.metering import ran_nothing

T = TypeVar("T")


async def serve_completion(
    gateway: Gateway,
    http: Request,
    caller: Caller,
    request: InferenceRequest,
    model: str,
    operation: Literal["chat", "text_completion"],
    include_usage: bool,
    echo: bool = False,
) -> Response:
    slot = gateway.admit()
    metering = gateway.metering
    try:
        request, hold = await metering.reserve(caller.key, request)
    except BaseException:
        slot.release()
        raise
    # One span per request: FastAPI's HTTP server span (current here; it ends with the response, a
    # stream's included), named and described by the GenAI conventions. A second span of our own
    # cost ~10 % of the gateway's CPU per request.
    span = trace.get_current_span()
    span.update_name(f"{operation} {model}")
    span.set_attributes(
        {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.system": "strata",
            "strata.request_id": request.request_id,
            **({"strata.client_request_id": request.client_request_id} if request.client_request_id else {}),
            **{
                f"gen_ai.request.{k}": v
                for k, v in request.sampling.model_dump(exclude_none=True).items()
                if isinstance(v, int | float)
            },
        }
    )
    headers = id_headers(http)
    if (
        context := span.get_span_context()
    ).is_valid:  # W3C: the caller finds the request's trace (and the ledger's records)
        headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    try:
        if request.stream:
            started, stream = await gateway.open_stream(request)
        else:
            reply = await unless_disconnected(http, gateway.complete(request))
    except BaseException as exc:
        slot.release()
        _record_error(span, exc)
        if ran_nothing(exc):
            await metering.settle(hold, 0)
        else:
            metering.settle_from_event(hold)
        raise
    salt = reply.prompt_salt if not request.stream else started.prompt_salt
    if salt is not None:  # for the caller alone: its receipt's prompt commitment checks with it (#19)
        headers[SALT_HEADER] = salt
    if not request.stream:
        slot.release()
        await metering.settle(
            hold, reply.usage.total_tokens
        )  # before answering: the caller may spend the refund at once
        _record_usage(
            span, reply.model.name, reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.finish_reason
        )
        body = (
            render.chat_completion(reply, model)
            if operation == "chat"
            else render.text_completion(reply, model, request.prompt or "" if echo else "")
        )
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)  # no dict in between

    sse = render.SseStream(
        request_id=request.request_id,
        model=model,
        chat=operation == "chat",
        include_usage=include_usage,
        echo=request.prompt or "" if echo else "",
        n=request.sampling.n,
    )

    async def events() -> AsyncIterator[bytes]:
        # A client that goes away cancels this generator at its await: the shared client's stream
        # then publishes an InferenceCancel on its own, without awaiting in a cancelled scope.
        message: Message = started
        try:
            while True:
                if isinstance(message, End):
                    await metering.settle(hold, message.usage.total_tokens)
                    _record_usage(
                        span,
                        started.model.name,
                        message.usage.prompt_tokens,
                        message.usage.completion_tokens,
                        message.finish_reason,
                    )
                if piece := sse.render(message):
                    yield piece
                if isinstance(message, End):
                    return
                message = await anext(stream)
        except errors.StrataError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            yield sse.error(to_openai(exc).body)
        except StopAsyncIteration:
            yield sse.error(to_openai(errors.StrataError("the worker's stream ended without an end marker")).body)

    async def finish() -> None:  # runs after the response, whether it completed or the client left
        slot.release()
        metering.settle_from_event(hold)  # a stream that ended without its ``end`` (no-op after a settle)
        await stream.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        background=BackgroundTask(finish),
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def unless_disconnected(http: Request, work: Awaitable[T], poll_s: float = 0.2) -> T:
    """Await ``work``, cancelling it (and so the generation, via an InferenceCancel) if the HTTP
    client hangs up first: a non-streaming response has no other way to learn that. Most requests
    end before the first check is due and cost one timer; a task per request to race ``work``
    against the watch was ~9 % of the gateway's CPU under load."""
    request_task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert request_task is not None
    watcher: asyncio.Task[None] | None = None
    hung_up = False

    async def watch() -> None:
        nonlocal hung_up
        while not await http.is_disconnected():
            await asyncio.sleep(poll_s)
        hung_up = True
        request_task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(poll_s, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if not hung_up:
            raise
        request_task.uncancel()  # the cancellation was ours, and is answered as an error
        raise errors.StrataError("the client disconnected") from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


def _record_usage(span: trace.Span, served: str, prompt: int, completion: int, finish: str) -> None:
    span.set_attributes(
        {
            "gen_ai.response.model": served,
            "gen_ai.usage.input_tokens": prompt,
            "gen_ai.usage.output_tokens": completion,
            "gen_ai.response.finish_reasons": [finish],
        }
    )


def _record_error(span: trace.Span, exc: BaseException) -> None:
    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
    span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
