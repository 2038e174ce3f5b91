"""Who asks and what they send, read once per request: the request's ids (ours, and the caller's
``x-request-id`` kept for correlation), the API key's holder (the ``caller`` dependency), and the
inference routes' body, read and validated by hand (``SolvedByHand``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Depends, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import errors
from shared.apikey_http import bearer
from shared.events import new_id
from shared.service import part_of, service_of

from services.api_gateway.service_layer.handlers import Caller, Gateway

M = TypeVar("M", bound=BaseModel)
# The caller's own id: echoed and kept as ``client_request_id``, never used as ours (two callers may
# send the same one, and events, receipts and cancellation need one id per request).
REQUEST_ID_HEADER = "x-request-id"
GATEWAY_REQUEST_ID_HEADER = "x-strata-request-id"  # the id the gateway made: the one in events and receipts
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# One dependency object for every route: FastAPI solves a dependency once per request only when it is
# the same callable (part_of makes a new one on each call).
started_gateway = part_of(Gateway)


async def caller(
    request: Request,
    x_request_id: str | None = Header(
        default=None, json_schema_extra={"pattern": _REQUEST_ID.pattern}
    ),  # documented; checked below with a clear message
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    gateway: Gateway = Depends(started_gateway),
) -> Caller:
    """A new request id (the caller's x-request-id is checked, and kept only for correlation) and
    the API key's holder: one dependency, as each one FastAPI solves per request costs CPU on the
    hottest path."""
    request.state.request_id = new_id()
    if x_request_id is not None and not _REQUEST_ID.match(x_request_id):
        raise errors.Invalid("x-request-id must be 1-128 characters of letters, digits and . _ : -")
    return await gateway.authenticate(credentials.credentials if credentials else None)


def id_headers(request: Request) -> dict[str, str]:
    """The ids an answer carries: the gateway's, and the caller's echoed (ours when it sent none, or
    one that is not a valid id)."""
    ours: str = getattr(request.state, "request_id", None) or new_id()
    theirs = request.headers.get(REQUEST_ID_HEADER)
    return {
        GATEWAY_REQUEST_ID_HEADER: ours,
        REQUEST_ID_HEADER: theirs if theirs and _REQUEST_ID.match(theirs) else ours,
    }


class SolvedByHand(APIRoute):
    """The inference routes' class. FastAPI documents them from the endpoint's signature as usual, but
    its generic per-request solving of that signature was a quarter of the gateway's CPU under load
    (py-spy, docs/benchmarks.md §1). Here ``caller``, the routes' one dependency, is called with the
    headers it declares, then the body is validated straight from its bytes, with FastAPI's checks in
    FastAPI's order (the key before the body; a JSON content type, which keeps a cross-origin form
    post out) and clearer messages. An endpoint on this class takes (body, request, caller, gateway)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        endpoint, model = self.endpoint, self.body_field.field_info.annotation  # type: ignore[union-attr]

        async def handle(request: Request) -> Response:
            gateway = service_of(request).part(Gateway)
            c = await caller(request, request.headers.get(REQUEST_ID_HEADER), await bearer(request), gateway)
            declared = request.headers.get("content-length", "")
            if declared.isdigit():  # refused before reading it
                gateway.check_body_size(int(declared))
            raw = await request.body()
            gateway.check_body_size(len(raw))  # a chunked body declares no length
            return await endpoint(parse_body(model, request.headers.get("content-type"), raw), request, c, gateway)

        return handle


def parse_body(model: type[M], content_type: str | None, raw: bytes) -> M:
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
