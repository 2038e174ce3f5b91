"""Typed errors that cross service boundaries. Domain code raises them; the HTTP layer answers with
their status and the NATS RPC layer with their code, so a caller always learns what went wrong."""

from __future__ import annotations


class StrataError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(StrataError):
    code, http_status = "invalid", 400


class ContextLengthExceeded(Invalid):
    """the prompt, or the prompt plus max_tokens, does not fit the model's context: the message names both
    numbers in OpenAI's words (which clients such as litellm match to raise their context-window error)"""

    code = "context_length_exceeded"

    @classmethod
    def of(cls, max_model_len: int, prompt_tokens: int, completion_tokens: int) -> ContextLengthExceeded:
        return cls(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                   f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} "
                   "in the completion). Please reduce the length of the messages or completion.")


class Unauthorized(StrataError):
    code, http_status = "unauthorized", 401


class Forbidden(StrataError):
    code, http_status = "forbidden", 403


class NotFound(StrataError):
    code, http_status = "not_found", 404


class Conflict(StrataError):
    code, http_status = "conflict", 409


class TooLarge(StrataError):
    code, http_status = "too_large", 413


class Unavailable(StrataError):
    code, http_status = "unavailable", 503


class ModelLoading(Unavailable):
    """An on-demand model did not finish loading within the worker's load time-out; the load goes on,
    so a retry soon finds it loaded."""

    code = "model_loading"


class ModelLoadFailed(StrataError):
    """An on-demand model could not be loaded (the reason says why); nothing of it stays in memory."""

    code, http_status = "model_load_failed", 500


class InsufficientStorage(StrataError):
    """not enough free space to store it: the message says how many bytes it needs and how many are free"""

    code, http_status = "insufficient_storage", 507


class BlobCorrupt(StrataError):
    """a stored blob no longer matches the store's own record of it (size, chunks, digest): the data is
    damaged, so retrying will not help (unlike Unavailable)"""

    code, http_status = "blob_corrupt", 500

    @classmethod
    def of(cls, sha256: str, why: str) -> BlobCorrupt:
        return cls(f"blob sha256:{sha256} is corrupt in the store: {why}")


BY_CODE: dict[str, type[StrataError]] = {
    cls.code: cls
    for cls in (
        StrataError,
        Invalid,
        ContextLengthExceeded,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        TooLarge,
        Unavailable,
        InsufficientStorage,
        ModelLoading,
        ModelLoadFailed,
        BlobCorrupt,
    )
}


def from_code(code: str, message: str) -> StrataError:
    return BY_CODE.get(code, StrataError)(message)
