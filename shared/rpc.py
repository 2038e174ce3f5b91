"""Request-reply between services over ``rpc.<service>.<op>``, with typed requests and errors.

Every reply is an ``RpcReply``: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code",
"message"}}``. A handler raises a ``shared.errors`` exception for a failure the caller should see;
the caller gets the same exception type back from ``call``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.errors import NoRespondersError, TimeoutError
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared import errors

log = logging.getLogger(__name__)
Req = TypeVar("Req", bound=BaseModel)
T = TypeVar("T")


class ErrorBody(BaseModel):
    code: str
    message: str


class RpcReply(BaseModel):
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


def parse(raw: bytes, request_type: type[Req]) -> Req:
    """A request body as ``request_type``, or ``errors.Invalid`` naming the first problem and where it is."""
    try:
        return request_type.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise errors.Invalid(f"invalid {request_type.__name__}: {exc.errors()[0]['msg']} at {_loc(exc)}") from None


async def answer(raw: bytes, request_type: type[Req], handler: Callable[[Req], Awaitable[Any]]) -> bytes:
    """Parse a request, run the handler, and encode its result or its error as an RpcReply."""
    try:
        request = parse(raw, request_type)
    except errors.Invalid as exc:
        return _error(exc)
    try:
        result = await handler(request)
    except errors.StrataError as exc:
        return _error(exc)
    except Exception as exc:  # a bug: the caller still gets a typed answer instead of a time-out
        log.exception("rpc handler %s failed", getattr(handler, "__name__", handler))
        return _error(errors.StrataError(f"internal error: {type(exc).__name__}: {exc}"))
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    return RpcReply(ok=True, result=result).model_dump_json().encode()


async def call(nc: Client, subject: str, request: BaseModel, result_type: type[T] | Any, timeout: float = 5.0) -> T:
    """Call an RPC and return its typed result, or raise the typed error the service answered."""
    try:
        msg = await nc.request(subject, request.model_dump_json().encode(), timeout=timeout)
    except NoRespondersError:
        raise errors.Unavailable(f"no service answers {subject}") from None
    except TimeoutError:
        raise errors.Unavailable(f"{subject} did not answer within {timeout}s") from None
    reply = RpcReply.model_validate_json(msg.data)
    if not reply.ok:
        assert reply.error is not None
        raise errors.from_code(reply.error.code, reply.error.message)
    return TypeAdapter(result_type).validate_python(reply.result)


def _error(exc: errors.StrataError) -> bytes:
    return RpcReply(ok=False, error=ErrorBody(code=exc.code, message=exc.message)).model_dump_json().encode()


def _loc(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"]) or "<root>"
