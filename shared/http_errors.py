"""The OpenAPI side of shared/errors.py: each route declares the typed errors it can answer, so a
client generated from the schema knows every status (and the ``{"error": {"code", "message"}}`` body).

``responses=error_responses(NotFound, Unavailable)`` on a route; a route behind an API key adds
``auth=True`` (401, 403, and 503 when the keys cannot be checked). FastAPI declares its own 422 for a
route with parameters or a body; these services answer a request that breaks the schema with it.
``typed_bad_requests(app)`` makes FastAPI's own 400 (a body it cannot read) the typed one too, and
``typed_internal_errors(app, service)`` an unexpected exception's 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from shared.errors import Conflict, Forbidden, Invalid, NotFound, StrataError, TooLarge, Unauthorized, Unavailable
from shared.rpc import ErrorBody

Responses = dict[int | str, dict[str, Any]]
ErrorSpec = type[StrataError] | tuple[type[StrataError], str]  # a class, or a class and this route's own description


class HttpError(BaseModel):
    """The body of every typed error: ``{"error": {"code", "message"}}``."""

    error: ErrorBody


DESCRIPTIONS: dict[type[StrataError], str] = {
    Invalid: "invalid request: a value breaks a rule (see the message)",
    Unauthorized: "missing, unknown or revoked API key",
    Forbidden: "the API key lacks the scope this route needs",
    NotFound: "what the request names does not exist",
    Conflict: "the request conflicts with the current state",
    TooLarge: "the request is too large",
    Unavailable: "not ready: the service is starting, or NATS or a peer service is unreachable (try again)",
    StrataError: "internal error",
}
AUTH_ERRORS: tuple[ErrorSpec, ...] = (
    Unauthorized, Forbidden, (Unavailable, "the API keys cannot be checked now (starting, or NATS unreachable)"),
)


def describe(error: type[StrataError]) -> str:
    """The first line of the class's own docstring, else the description of its kind."""
    own = error.__dict__.get("__doc__")
    if own and own.strip():
        return own.strip().splitlines()[0]
    return next(text for cls, text in DESCRIPTIONS.items() if issubclass(error, cls))


def error_responses(*errors: ErrorSpec, auth: bool = False, model: type[BaseModel] = HttpError) -> Responses:
    """FastAPI ``responses=`` for these typed errors (status -> body model and description); ``auth``
    adds those of an API-key-protected route. Two errors with one status share it, descriptions joined."""
    responses: Responses = {}
    for spec in (*AUTH_ERRORS, *errors) if auth else errors:
        error, description = spec if isinstance(spec, tuple) else (spec, describe(spec))
        found = responses.setdefault(error.http_status, {"model": model, "description": description})
        if description not in found["description"].split("; "):
            found["description"] = f"{found['description']}; {description}"
    return responses


def auth_responses(model: type[BaseModel] = HttpError) -> Responses:
    """The OpenAPI ``responses`` of a protected route that answers no other typed error."""
    return error_responses(auth=True, model=model)


AUTH_RESPONSES = auth_responses()


def typed_bad_requests(app: FastAPI) -> None:
    """FastAPI answers a request body it cannot read (bytes that are not UTF-8 JSON) with its own 400
    ``{"detail": ...}``: answer it as the typed Invalid instead, the one 400 body a route declares.
    Every other HTTPException (404 for an unknown path, 405, ...) keeps FastAPI's answer."""

    async def bad_request_as_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code != Invalid.http_status:
            return await http_exception_handler(request, exc)
        body = HttpError(error=ErrorBody(code=Invalid.code, message=str(exc.detail)))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(HTTPException, bad_request_as_invalid)


def typed_internal_errors(app: FastAPI, service: str) -> None:
    """An exception that no route turned into a typed error is answered ``{"error": {"code": "internal",
    ...}}`` with 500, never Starlette's bare "Internal Server Error" page, which a client cannot read.
    The message names the exception's type only (its text may hold paths or secrets); the traceback
    still goes to the service's log."""

    async def internal_error(_request: Request, exc: Exception) -> Response:
        message = f"internal error in {service} ({type(exc).__name__}); its log has the details"
        body = HttpError(error=ErrorBody(code=StrataError.code, message=message))
        return JSONResponse(body.model_dump(), status_code=StrataError.http_status)

    app.add_exception_handler(Exception, internal_error)
