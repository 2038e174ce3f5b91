"""Per-key quotas as token buckets: plain Python with an injectable clock.

``requests_per_minute`` is taken at admission, so it holds per gateway replica (each replica keeps
its own buckets). ``tokens_per_minute`` is post-paid: a request is admitted while the key's token
bucket is above zero, and the tokens of each ``inference.completed`` event are charged afterwards
(the bucket may go into debt). Every replica sees every inference event, so each one charges all of
a key's tokens and the token quota holds across replicas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import errors
from shared.apikeys import ApiKeyRecord

Clock = Callable[[], float]


class QuotaExceeded(errors.StrataError):
    """A key is over one of its quotas; ``retry_after_s`` is when its bucket has refilled enough."""

    code, http_status = "rate_limit_exceeded", 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenBucket:
    """Holds up to ``per_minute`` units and refills at ``per_minute / 60`` units a second."""

    def __init__(self, per_minute: int, clock: Clock) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = float(per_minute)
        self._at = clock()

    @property
    def level(self) -> float:
        now = self._clock()
        self._level = min(float(self.per_minute), self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` if it is there and return 0; else take nothing and return the seconds until it is."""
        level = self.level
        if level >= amount:
            self._level = level - amount
            return 0.0
        return (amount - level) / self.rate

    def charge(self, amount: float) -> None:
        """Take ``amount`` whether or not it is there (usage already spent): the bucket may go into debt."""
        self._level = self.level - amount

    def seconds_until_positive(self) -> float:
        level = self.level
        return 0.0 if level > 0 else (-level) / self.rate + 1e-9


def whole_seconds(seconds: float) -> int:
    """Retry-After is whole seconds, rounded up, and never 0 (a 0 invites an immediate retry)."""
    return max(1, math.ceil(seconds - 1e-9))


@dataclass
class KeyBuckets:
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None


@dataclass
class Quotas:
    clock: Clock = time.monotonic
    _keys: dict[str, KeyBuckets] = field(default_factory=dict)

    def _buckets(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> KeyBuckets:
        """The key's buckets, (re)made when its limits differ from what they were made with."""
        b = self._keys.setdefault(key_id, KeyBuckets())
        if (b.requests.per_minute if b.requests else None) != requests_per_minute:
            b.requests = TokenBucket(requests_per_minute, self.clock) if requests_per_minute else None
        if (b.tokens.per_minute if b.tokens else None) != tokens_per_minute:
            b.tokens = TokenBucket(tokens_per_minute, self.clock) if tokens_per_minute else None
        return b

    def admit(self, key: ApiKeyRecord) -> None:
        """Count one request against ``key``'s quotas, or raise QuotaExceeded (counting nothing)."""
        b = self._buckets(key.id, key.requests_per_minute, key.tokens_per_minute)
        if b.tokens is not None and (wait := b.tokens.seconds_until_positive()) > 0:
            raise QuotaExceeded(
                f"API key {key.id} ({key.name}) is over its tokens_per_minute quota of {b.tokens.per_minute} "
                f"tokens; retry in {whole_seconds(wait)} s", whole_seconds(wait))
        if b.requests is not None and (wait := b.requests.take(1)) > 0:
            raise QuotaExceeded(
                f"API key {key.id} ({key.name}) is over its requests_per_minute quota of {b.requests.per_minute} "
                f"requests (per gateway replica); retry in {whole_seconds(wait)} s", whole_seconds(wait))

    def charge(self, key: ApiKeyRecord, tokens: int) -> None:
        """Charge the tokens one finished inference used (prompt + completion) to ``key``."""
        b = self._buckets(key.id, key.requests_per_minute, key.tokens_per_minute)
        if b.tokens is not None and tokens > 0:
            b.tokens.charge(tokens)
