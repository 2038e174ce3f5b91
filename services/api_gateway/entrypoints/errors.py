"""Every error, this gateway's or FastAPI's, answered in OpenAI's shape (replacing Service's default),
with the request's ids; the refusals (4xx, and overload) counted by reason at /metrics."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import errors
from shared.service import service_of
from shared.service_metrics import ServiceMetrics

from services.api_gateway.domain.errors import OpenAIError, invalid, to_openai
from services.api_gateway.domain.responses import ErrorBody, ErrorDetail
from services.api_gateway.entrypoints.callers import id_headers

log = logging.getLogger("api-gateway")


class Refusals:
    """The refusals counter, provided as a part of the service so that the module-level handlers below
    count into the registry of the service that serves the request."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._service = metrics.service
        self._counter = Counter(
            "strata_gateway_refusals",
            "Requests refused, by reason (auth, quota, overload, context, "
            "not_found, validation); failures of ours (5xx) are not refusals",
            ["service", "reason"],
            registry=metrics.registry,
        )

    def count(self, reason: str) -> None:
        self._counter.labels(self._service, reason).inc()


def respond(request: Request, error: OpenAIError) -> JSONResponse:
    if error.refusal is not None:
        service_of(request).part(Refusals).count(error.refusal)
    headers = {**error.headers, **id_headers(request)}
    return JSONResponse(error.body.model_dump(mode="json"), status_code=error.status, headers=headers)


async def strata_error(request: Request, exc: errors.StrataError) -> JSONResponse:
    return respond(request, to_openai(exc))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:  # still an OpenAI error, never HTML
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return respond(request, to_openai(errors.StrataError(f"internal error: {type(exc).__name__}")))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # e.g. a body that is not JSON
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = ErrorBody(error=ErrorDetail(message=str(exc.detail), type=kind))
    return respond(request, OpenAIError(status=exc.status_code, body=body))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    errors.StrataError: strata_error,  # type: ignore[dict-item]
    Exception: unexpected_error,
    StarletteHTTPException: http_error,  # type: ignore[dict-item]
    RequestValidationError: validation_error,  # type: ignore[dict-item]
}
