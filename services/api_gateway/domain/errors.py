"""Strata's typed errors as OpenAI error objects: status code, ``type``, ``code`` and, for overload,
how many seconds the caller should wait before retrying."""

from __future__ import annotations

from dataclasses import dataclass

from shared import errors

from services.api_gateway.domain.responses import ErrorBody, ErrorDetail

RETRY_AFTER_S = 1


class Overloaded(errors.StrataError):
    """This gateway has as many requests in flight as it is configured to carry."""

    code, http_status = "rate_limit_exceeded", 429


class ModelNotDeployed(errors.NotFound):
    code = "model_not_found"


@dataclass(frozen=True)
class OpenAIError:
    status: int
    body: ErrorBody
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}
_CODES = {"unauthorized": "invalid_api_key", "invalid": "invalid_value", "not_found": "model_not_found",
          "unavailable": "overloaded", "too_large": "request_too_large"}
_PARAMS = {errors.ContextLengthExceeded: "messages"}  # as OpenAI names it, for chat and completions alike


def to_openai(exc: errors.StrataError, param: str | None = None) -> OpenAIError:
    status = exc.http_status
    if isinstance(exc, errors.NotFound):
        param = param or "model"
    param = param or _PARAMS.get(type(exc))
    detail = ErrorDetail(message=exc.message, type=_TYPES.get(status, "server_error"), param=param,
                         code=_CODES.get(exc.code, exc.code))
    # a quota knows when its bucket refills; overload has no such date, so the caller tries again soon
    retry = getattr(exc, "retry_after_s", None) or (RETRY_AFTER_S if status in (429, 503) else None)
    return OpenAIError(status=status, body=ErrorBody(error=detail), retry_after_s=retry)


def invalid(message: str, param: str | None) -> OpenAIError:
    return to_openai(errors.Invalid(message), param)
