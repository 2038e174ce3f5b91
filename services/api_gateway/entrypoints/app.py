"""api-gateway: the OpenAI-compatible HTTP edge. It owns nothing durable and consumes no events: it
turns HTTP calls into inference requests on NATS (shared/inference_client.py) and answers in
OpenAI's shapes, with OpenAI's error objects and status codes. API keys (scope ``inference``):
shared/apikey_http.py; their quotas, reserved at admission and settled at the end in counters every
replica shares: service_layer/metering.py."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import Counter
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import errors
from shared.apikey_http import AuthMode, KeyAuth, bearer, drop_route, protect
from shared.config import Settings
from shared.contracts import api_gateway as contract
from shared.events import new_id
from shared.inference import End, InferenceRequest
from shared.prompt_commitment import SALT_HEADER
from shared.replication import stream_replicas
from shared.service import Health, Service
from shared.service_metrics import ServiceMetrics

from services.api_gateway.domain import render
from services.api_gateway.domain.embeddings import EmbeddingsRequest, EmbeddingsResponse
from services.api_gateway.domain.errors import OpenAIError, invalid, to_openai
from services.api_gateway.domain.requests import ChatCompletionRequest, CompletionRequest
from services.api_gateway.domain.responses import (
    ChatCompletion,
    Completion,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
)
from services.api_gateway.adapters.quota_counters import KvQuotaCounters
from services.api_gateway.service_layer import embeddings
from services.api_gateway.config import GatewayConfig
from services.api_gateway.service_layer.handlers import Caller, Gateway, Message
from services.api_gateway.service_layer.metering import ran_nothing

log = logging.getLogger("api-gateway")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
# The caller's own id: echoed and kept as ``client_request_id``, never used as ours (two callers may
# send the same one, and events, receipts and cancellation need one id per request).
REQUEST_ID_HEADER = "x-request-id"
GATEWAY_REQUEST_ID_HEADER = "x-strata-request-id"  # the id the gateway made: the one in events and receipts
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d}
    for s, d in (
        (
            400,
            "invalid request; code context_length_exceeded: the prompt, or the prompt plus max_tokens, is over the "
            "model's context (the message names both numbers)",
        ),
        (401, "missing, unknown or revoked API key"),
        (403, "the API key lacks the 'inference' scope"),
        (404, "model not deployed"),
        (413, "the body is over the gateway's limit (the message names it); do not retry it"),
        (
            429,
            "the API key is over its requests_per_minute or tokens_per_minute quota, or the gateway is "
            "overloaded (Retry-After: whole seconds)",
        ),
        (502, "the worker died"),
        (503, "workers overloaded, or the quota counters out of reach for a key with a quota (Retry-After)"),
        (504, "timed out"),
    )
}


class GatewayHealth(Health):
    auth: AuthMode
    in_flight: int
    max_in_flight: int


def create_service(settings: Settings | None = None, config: GatewayConfig | None = None) -> Service:
    config = config or GatewayConfig.from_env()
    service = Service(
        "api-gateway",
        settings,
        description="OpenAI-compatible HTTP API in front of the workers. "
        "Every /v1 route needs an API key with the 'inference' scope (or 'admin'); /healthz is open.",
    )
    # The gateway never writes a key (it makes the bucket only where NATS has no users and nothing provisioned
    # it); STRATA_API_KEYS are honoured by this gateway alone.
    auth = protect(service, create_bucket=True, local_keys=config.seed_keys, health=False)
    gateway = Gateway(config, lambda: service.broker.connection, auth)
    service.provide(gateway)
    app = service.http

    @service.on_start
    async def _open_quotas() -> None:
        nc = service.broker.connection
        # `strata up` provisions the bucket (cli/provision.py); where NATS has no users, it is made here if missing.
        gateway.metering.counters = await KvQuotaCounters.open(nc.jetstream(), stream_replicas(), create=True)
        # every replica, no queue group: the one holding a request's reservation settles it
        await nc.subscribe(contract.COMPLETIONS.subject, cb=gateway.metering.on_completed)

    _install_errors(app, service.metrics)
    _replace_health(service, gateway, auth)

    async def caller(
        request: Request,
        x_request_id: str | None = Header(
            default=None, json_schema_extra={"pattern": _REQUEST_ID.pattern}
        ),  # documented; checked below with a clear message
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Caller:
        """A new request id (the caller's x-request-id is checked, and kept only for correlation) and
        the API key's holder: one dependency, as each one FastAPI solves per request costs CPU on the
        hottest path."""
        request.state.request_id = new_id()
        if x_request_id is not None and not _REQUEST_ID.match(x_request_id):
            raise errors.Invalid("x-request-id must be 1-128 characters of letters, digits and . _ : -")
        return await gateway.authenticate(credentials.credentials if credentials else None)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"])
    async def list_models(request: Request, response: Response, c: Caller = Depends(caller)) -> ModelList:
        response.headers.update(_id_headers(request))
        return await gateway.list_models(c)

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS, tags=["openai"])
    async def retrieve_model(
        model_id: str, request: Request, response: Response, c: Caller = Depends(caller)
    ) -> ModelCard:
        response.headers.update(_id_headers(request))
        return await gateway.retrieve_model(c, model_id)

    inference = APIRouter(route_class=_solved_by_hand(caller, gateway))

    @inference.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request, c: Caller = Depends(caller)) -> Response:
        return await _serve(
            gateway, request, c, _inference_of(body, request, c), body.model, "chat", body.include_usage
        )

    @inference.post("/v1/completions", response_model=Completion, responses=_ERRORS, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request, c: Caller = Depends(caller)) -> Response:
        return await _serve(
            gateway,
            request,
            c,
            _inference_of(body, request, c),
            body.model,
            "text_completion",
            body.include_usage,
            echo=body.echo,
        )

    @inference.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS, tags=["openai"])
    async def create_embeddings(body: EmbeddingsRequest, request: Request, c: Caller = Depends(caller)) -> Response:
        trace.get_current_span().update_name(f"embeddings {body.model}")
        # a client that hangs up cancels it: the worker hears an infer.cancel and its engine computes no more
        reply, salt = await _unless_disconnected(
            request,
            embeddings.embed(gateway, c, body, request.state.request_id, request.headers.get(REQUEST_ID_HEADER)),
        )
        headers = {**_id_headers(request), **({SALT_HEADER: salt} if salt else {})}
        return Response(reply, media_type="application/json", headers=headers)

    app.include_router(inference)
    return service


def _id_headers(request: Request) -> dict[str, str]:
    """The ids an answer carries: the gateway's, and the caller's echoed (ours when it sent none, or
    one that is not a valid id)."""
    ours: str = getattr(request.state, "request_id", None) or new_id()
    theirs = request.headers.get(REQUEST_ID_HEADER)
    return {
        GATEWAY_REQUEST_ID_HEADER: ours,
        REQUEST_ID_HEADER: theirs if theirs and _REQUEST_ID.match(theirs) else ours,
    }


def _inference_of(body: ChatCompletionRequest | CompletionRequest, request: Request, c: Caller) -> InferenceRequest:
    return body.to_inference(request.state.request_id).model_copy(
        update={"api_key_id": c.key_id, "client_request_id": request.headers.get(REQUEST_ID_HEADER)}
    )


def _solved_by_hand(
    caller: Callable[[Request, str | None, HTTPAuthorizationCredentials | None], Awaitable[Caller]], gateway: Gateway
) -> type[APIRoute]:
    """The inference routes' class. FastAPI documents them from the endpoint's signature as usual, but
    its generic per-request solving of that signature was a quarter of the gateway's CPU under load
    (py-spy, docs/benchmarks.md §1). Here ``caller``, the routes' one dependency, is called with the
    headers it declares, then the body is validated straight from its bytes, with FastAPI's checks in
    FastAPI's order (the key before the body; a JSON content type, which keeps a cross-origin form
    post out) and clearer messages. An endpoint on this class takes (body, request, caller)."""

    class SolvedByHand(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            endpoint, model = self.endpoint, self.body_field.field_info.annotation  # type: ignore[union-attr]

            async def handle(request: Request) -> Response:
                c = await caller(request, request.headers.get(REQUEST_ID_HEADER), await bearer(request))
                declared = request.headers.get("content-length", "")
                if declared.isdigit():  # refused before reading it
                    gateway.check_body_size(int(declared))
                raw = await request.body()
                gateway.check_body_size(len(raw))  # a chunked body declares no length
                return await endpoint(_parse_body(model, request.headers.get("content-type"), raw), request, c)

            return handle

    return SolvedByHand


def _parse_body(model: type[M], content_type: str | None, raw: bytes) -> M:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise StarletteHTTPException(
            400, f"the body must be JSON with Content-Type: application/json (got {content_type or 'none'!r})"
        )
    if not raw:
        raise StarletteHTTPException(400, "the request has no body: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        if problems[0]["type"] == "json_invalid":  # not JSON at all: FastAPI's 400, with the parser's reason
            raise StarletteHTTPException(400, f"There was an error parsing the body: {problems[0]['msg']}") from None
        raise RequestValidationError(problems) from None


async def _serve(
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
    headers = _id_headers(http)
    if (
        context := span.get_span_context()
    ).is_valid:  # W3C: the caller finds the request's trace (and the ledger's records)
        headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    try:
        if request.stream:
            started, stream = await gateway.open_stream(request)
        else:
            reply = await _unless_disconnected(http, gateway.complete(request))
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


async def _unless_disconnected(http: Request, work: Awaitable[T], poll_s: float = 0.2) -> T:
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


def _install_errors(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Every error, this gateway's or FastAPI's, in OpenAI's shape (replacing Service's default); the
    refusals (4xx, and overload) counted by reason at /metrics."""
    refusals = Counter(
        "strata_gateway_refusals",
        "Requests refused, by reason (auth, quota, overload, context, "
        "not_found, validation); failures of ours (5xx) are not refusals",
        ["service", "reason"],
        registry=metrics.registry,
    )

    def respond(request: Request, error: OpenAIError) -> JSONResponse:
        if error.refusal is not None:
            refusals.labels(metrics.service, error.refusal).inc()
        headers = {**error.headers, **_id_headers(request)}
        return JSONResponse(error.body.model_dump(mode="json"), status_code=error.status, headers=headers)

    @app.exception_handler(errors.StrataError)
    async def _strata(request: Request, exc: errors.StrataError) -> JSONResponse:
        return respond(request, to_openai(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # still an OpenAI error, never an HTML page
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return respond(request, to_openai(errors.StrataError(f"internal error: {type(exc).__name__}")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(
        request: Request, exc: StarletteHTTPException
    ) -> JSONResponse:  # e.g. a body that is not JSON at all
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = ErrorBody(error=ErrorDetail(message=str(exc.detail), type=kind))
        return respond(request, OpenAIError(status=exc.status_code, body=body))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # pydantic's loc for a union ("str", "list[...]") names the variant, not the field
        param = ".".join(p for p in loc if not p.startswith(("str", "list[", "function-", "literal[", "int", "float")))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif first.get("type") == "missing":
            message = f"missing required parameter: {param}"
        elif param:
            message = f"invalid value for '{param}': {message}"
        return respond(request, invalid(message, param or None))


def _replace_health(service: Service, gateway: Gateway, auth: KeyAuth) -> None:
    """/healthz (open) also says whether the gateway is open (no API key configured) and how loaded it is."""
    drop_route(service.http, "/healthz")

    @service.http.get("/healthz", response_model=GatewayHealth, tags=["health"])
    async def health() -> JSONResponse:
        base = service.health()
        body = GatewayHealth(
            **base.model_dump(),
            auth=await auth.mode(),
            in_flight=gateway.in_flight,
            max_in_flight=gateway.config.max_in_flight,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if base.status == "ok" else 503)
