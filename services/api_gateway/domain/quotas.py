"""Per-key quotas: the pure rules, no I/O. The state they change lives in counters that every gateway
replica shares (adapters/quota_counters.py), one ``KeyUsage`` per key, changed by compare-and-set.

Each quota is a token bucket that holds up to a minute's worth and refills continuously.
``requests_per_minute`` takes 1 per request. ``tokens_per_minute`` takes a *reservation* at
admission, a bound on the request's prompt tokens plus its ``max_tokens``, and gives back what the
request did not use when it ends (``settle``). Charging only after the fact let 30 concurrent
requests on a 100-token key all pass a check made before any of them was charged (issue #19).

A reservation larger than a whole minute's quota could never fit: it is admitted into a full bucket
only, and leaves it in debt until it refills. So in any minute a key is served at most its quota
plus one request.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from shared import errors
from shared.apikeys import ApiKeyRecord
from shared.inference import InferenceRequest

# Special and template tokens a prompt's text does not show: BOS/EOS, and a chat template's role
# markers per message and assistant header at the end. Generous for the templates we serve; a
# template that adds more (a long default system prompt) is charged at settlement.
PROMPT_FRAME_TOKENS = 8
MESSAGE_FRAME_TOKENS = 8


class QuotaExceeded(errors.StrataError):
    """A key is over one of its quotas; ``retry_after_s`` is when its bucket has refilled enough."""

    code, http_status = "rate_limit_exceeded", 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def whole_seconds(seconds: float) -> int:
    """Retry-After is whole seconds, rounded up, and never 0 (a 0 invites an immediate retry)."""
    return max(1, math.ceil(seconds - 1e-9))


class Bucket(BaseModel):
    """One quota's state: ``level`` units at wall-clock time ``at`` (seconds since the epoch: every
    replica reads the same value, so no replica's monotonic clock would do)."""

    model_config = ConfigDict(frozen=True)
    per_minute: int = Field(ge=1)
    level: float = Field(
        description="may be negative: the debt of a request larger than the quota, or of usage over its reservation"
    )
    at: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    def at_time(self, now: float, per_minute: int) -> Bucket:
        """This bucket refilled up to ``now``, under the key's current limit (clamped if it was lowered)."""
        level = min(float(per_minute), self.level + max(0.0, now - self.at) * per_minute / 60.0)
        return Bucket(per_minute=per_minute, level=level, at=max(self.at, now))

    def wait_for(self, amount: float) -> float:
        """0 if ``amount`` may be taken now, else the seconds until it may (more than a minute's worth
        waits for a full bucket)."""
        need = min(amount, float(self.per_minute))
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def adjusted(self, amount: float) -> Bucket:
        """``amount`` added (negative: taken), never above a minute's worth."""
        return self.model_copy(update={"level": min(float(self.per_minute), self.level + amount)})


class KeyUsage(BaseModel):
    """A key's quota state: the one value per key in the shared counters."""

    model_config = ConfigDict(frozen=True)
    requests: Bucket | None = None
    tokens: Bucket | None = None


def is_metered(key: ApiKeyRecord) -> bool:
    """Whether ``key`` has a quota at all: an unlimited key costs no counter round trip."""
    return key.requests_per_minute is not None or key.tokens_per_minute is not None


def _current(stored: Bucket | None, per_minute: int | None, now: float) -> Bucket | None:
    if per_minute is None:
        return None
    if stored is None:  # never used, or untouched for longer than the counters keep a value: full
        return Bucket(per_minute=per_minute, level=float(per_minute), at=now)
    return stored.at_time(now, per_minute)


def admit(usage: KeyUsage | None, key: ApiKeyRecord, tokens: int, now: float) -> KeyUsage:
    """Take one request and reserve ``tokens`` from ``key``'s buckets, or raise QuotaExceeded
    (taking nothing). ``tokens`` 0 (a route that runs no model) leaves the token bucket alone."""
    requests = _current(usage.requests if usage else None, key.requests_per_minute, now)
    reserved = _current(usage.tokens if usage else None, key.tokens_per_minute, now)
    if reserved is not None and tokens > 0 and (wait := reserved.wait_for(tokens)) > 0:
        raise QuotaExceeded(
            f"API key {key.id} ({key.name}) is over its tokens_per_minute quota of {reserved.per_minute} tokens "
            f"(this request reserves {tokens}: a bound on its prompt plus max_tokens); "
            f"retry in {whole_seconds(wait)} s",
            whole_seconds(wait),
        )
    if requests is not None and (wait := requests.wait_for(1)) > 0:
        raise QuotaExceeded(
            f"API key {key.id} ({key.name}) is over its requests_per_minute quota of {requests.per_minute} "
            f"requests; retry in {whole_seconds(wait)} s",
            whole_seconds(wait),
        )
    return KeyUsage(
        requests=requests.adjusted(-1) if requests else None, tokens=reserved.adjusted(-tokens) if reserved else None
    )


def settle(usage: KeyUsage | None, key: ApiKeyRecord, refund: int, now: float) -> KeyUsage:
    """Give back ``refund`` reserved tokens a request did not use (negative: it used more than it
    reserved, and the rest is charged)."""
    tokens = _current(usage.tokens if usage else None, key.tokens_per_minute, now)
    return KeyUsage(requests=usage.requests if usage else None, tokens=tokens.adjusted(refund) if tokens else None)


def prompt_token_bound(request: InferenceRequest) -> int:
    """An upper bound on the prompt's tokens without its tokenizer: the UTF-8 byte length of its text,
    plus each message's role and frame. Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen) and
    SentencePiece with byte fallback never make more tokens than the text has bytes: each token
    covers at least one byte."""
    if request.messages is None:
        return len((request.prompt or "").encode()) + PROMPT_FRAME_TOKENS
    return PROMPT_FRAME_TOKENS + sum(
        len(m.content.encode()) + len(m.role) + MESSAGE_FRAME_TOKENS for m in request.messages
    )


def bounded(request: InferenceRequest, max_tokens_cap: int) -> tuple[InferenceRequest, int]:
    """``request`` with a ``max_tokens`` (``max_tokens_cap`` where it had none: a reservation needs a
    bound, and the worker then enforces it), and the tokens it reserves: its prompt's bound plus that."""
    if request.sampling.max_tokens is None:
        request = request.model_copy(
            update={"sampling": request.sampling.model_copy(update={"max_tokens": max_tokens_cap})}
        )
    return request, prompt_token_bound(request) + (request.sampling.max_tokens or max_tokens_cap) * request.sampling.n
