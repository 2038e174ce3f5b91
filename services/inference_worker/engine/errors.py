"""One exception hierarchy for everything that can be wrong with a checkpoint directory.

Every error carries the offending file (``path``) and, where it applies, the tensor name
(``tensor``), and both also appear in the message."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.tensor = tensor


class MissingFileError(CheckpointError):
    pass


class ConfigError(CheckpointError):
    pass


class UnsupportedArchitectureError(ConfigError):
    pass


class PickleCheckpointError(CheckpointError):
    pass


class MissingTensorError(CheckpointError):
    pass


class UnexpectedTensorError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


class TokenizerError(CheckpointError):
    pass


class InvalidRequestError(ValueError):
    """A request the engine refuses before queueing it (``add_request(..., reject_invalid=True)``)."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit ``max_model_len``. ``completion_tokens``
    is the request's max_tokens, or the one token it must at least generate when it set none."""

    def __init__(self, message: str, *, max_model_len: int, prompt_tokens: int, completion_tokens: int):
        super().__init__(message)
        self.max_model_len, self.prompt_tokens, self.completion_tokens = max_model_len, prompt_tokens, completion_tokens
