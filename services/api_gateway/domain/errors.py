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


class InputTooLong(errors.ContextLengthExceeded):
    """An embeddings input over the model's context: OpenAI names the ``input`` parameter for it."""


@dataclass(frozen=True)
class OpenAIError:
    status: int
    body: ErrorBody
    retry_after_s: int | None = None
    overloaded: bool = False  # a 429 of this gateway's in-flight limit, not of a key's quota

    @property
    def refusal(self) -> str | None:
        """Why the caller was refused (auth, quota, overload, context, not_found, validation), or None
        for a failure of ours (5xx): refusals are counted apart and never feed the failure alert."""
        if self.status in (401, 403):
            return "auth"
        if self.status == 429:
            return "overload" if self.overloaded else "quota"
        if self.status == 503:
            return "overload"
        if self.body.error.code == "context_length_exceeded":
            return "context"
        if self.status == 404:
            return "not_found"
        return "validation" if 400 <= self.status < 500 else None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}
_CODES = {"unauthorized": "invalid_api_key", "invalid": "invalid_value", "not_found": "model_not_found",
          "unavailable": "overloaded", "too_large": "request_too_large"}
_PARAMS = {errors.ContextLengthExceeded: "messages",  # as OpenAI names it, for chat and completions alike
           InputTooLong: "input"}


def to_openai(exc: errors.StrataError, param: str | None = None) -> OpenAIError:
    status = exc.http_status
    if isinstance(exc, errors.NotFound):
        param = param or "model"
    param = param or _PARAMS.get(type(exc))
    detail = ErrorDetail(message=exc.message, type=_TYPES.get(status, "server_error"), param=param,
                         code=_CODES.get(exc.code, exc.code))
    # a quota knows when its bucket refills; overload has no such date, so the caller tries again soon
    retry = getattr(exc, "retry_after_s", None) or (RETRY_AFTER_S if status in (429, 503) else None)
    return OpenAIError(status=status, body=ErrorBody(error=detail), retry_after_s=retry,
                       overloaded=isinstance(exc, Overloaded))


def invalid(message: str, param: str | None) -> OpenAIError:
    return to_openai(errors.Invalid(message), param)
