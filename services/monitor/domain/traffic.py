"""The request windows: per model, one rollup per second of event time, each with the second's counts
and log-binned latency histograms.

What it costs depends on how many seconds a window spans and how many models there are, not on the
request rate. The first design kept every request in a deque capped at 50,000: at 2,000 requests/s a
300 s alert window silently covered the last 25 s, and every alert evaluation (once a second) and every
dashboard push walked and sorted all of them.

A percentile read from a histogram is the centre of its bin, kept within the smallest and largest
value seen: within 1.1 % of the exact nearest-rank value (``BINS_PER_DOUBLING``), and exact when every
request took the same time. Windows start on whole seconds: a window of ``w`` seconds at ``now`` holds
the seconds from ``floor(now - w)`` on.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

BINS_PER_DOUBLING = 32  # bin i holds [2^(i/32), 2^((i+1)/32)): its centre is within 1.1 % of anything in it
_ZERO_BIN = -(1 << 30)  # latencies of (nearly) nothing: reported as 0.0
_SMALLEST_S, _LARGEST_S = 1e-6, 1e9  # an infinite latency (valid JSON for a float) lands in the top bin


def latency_bin(seconds: float) -> int:
    if not seconds >= _SMALLEST_S:  # NaN too
        return _ZERO_BIN
    return math.floor(math.log2(min(seconds, _LARGEST_S)) * BINS_PER_DOUBLING)


def bin_value(index: int) -> float:
    return 0.0 if index == _ZERO_BIN else 2.0 ** ((index + 0.5) / BINS_PER_DOUBLING)


@dataclass
class Latencies:
    """A histogram of latencies (bin index -> count) and the exact smallest and largest of them."""

    bins: Counter[int] = field(default_factory=Counter)
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, seconds: float) -> None:
        self.bins[latency_bin(seconds)] += 1
        self.lo, self.hi = min(self.lo, seconds), max(self.hi, seconds)

    def merge(self, other: Latencies) -> None:
        self.bins.update(other.bins)
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def percentile(self, q: float) -> float:
        """The nearest-rank percentile (q in 0..100); NaN when there are none."""
        total = sum(self.bins.values())
        if not total:
            return math.nan
        rank, seen = max(1, math.ceil(q / 100 * total)), 0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen >= rank:
                return min(max(bin_value(index), self.lo), self.hi)
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Rollup:
    """The requests of one model over some seconds: counts, tokens, and the successful ones' latencies."""

    requests: int = 0
    failed: int = 0
    completion_tokens: int = 0
    e2e: Latencies = field(default_factory=Latencies)  # the successful requests' end-to-end seconds
    ttft: Latencies = field(default_factory=Latencies)  # their time to first token

    @property
    def ok(self) -> int:
        return self.requests - self.failed

    def record(self, ok: bool, e2e_s: float, ttft_s: float = 0.0, completion_tokens: int = 0) -> None:
        self.requests += 1
        if not ok:
            self.failed += 1
            return
        self.completion_tokens += completion_tokens
        self.e2e.add(e2e_s)
        self.ttft.add(ttft_s)

    def merge(self, other: Rollup, *, ttft: bool = True) -> None:
        self.requests += other.requests
        self.failed += other.failed
        self.completion_tokens += other.completion_tokens
        self.e2e.merge(other.e2e)
        if ttft:
            self.ttft.merge(other.ttft)

    def e2e_percentile(self, q: float) -> float:
        return self.e2e.percentile(q)

    def ttft_percentile(self, q: float) -> float:
        return self.ttft.percentile(q)


BLOCK_S = 10  # a window merges whole 10 s blocks, and single seconds only at its start


@dataclass
class _Held:
    seconds: dict[int, Rollup] = field(default_factory=dict)
    blocks: dict[int, Rollup] = field(default_factory=dict)  # by the block's first second


class Traffic:
    """Every model's per-second rollups (and 10 s blocks of them) for the last ``horizon_s`` seconds
    before ``clock()``; an older request is not kept. The clock, not the newest event time: one event
    stamped far in the future by a skewed clock would otherwise make every other one look too old."""

    def __init__(self, horizon_s: float, clock: Callable[[], float] = time.time) -> None:
        self.horizon_s, self.clock = horizon_s, clock
        self._held: dict[str, _Held] = {}

    def record(
        self, model: str, at: float, ok: bool, e2e_s: float, ttft_s: float = 0.0, completion_tokens: int = 0
    ) -> None:
        second = math.floor(at)
        oldest = self.clock() - self.horizon_s
        if second < oldest - 1:
            return
        held = self._held.setdefault(model, _Held())
        rollup = held.seconds.get(second)
        if rollup is None:
            rollup = held.seconds[second] = Rollup()
            if len(held.seconds) > self.horizon_s + 60:  # now and then, not on every new second
                self._forget_before(oldest - 1)
        rollup.record(ok, e2e_s, ttft_s, completion_tokens)
        block = second - second % BLOCK_S
        (held.blocks.get(block) or held.blocks.setdefault(block, Rollup())).record(ok, e2e_s, ttft_s, completion_tokens)

    def window(self, now: float, seconds: float, model: str | None = None, *, ttft: bool = True) -> Rollup:
        """The requests that finished from ``floor(now - seconds)`` on (of one model, or of all);
        ``ttft=False`` leaves the time-to-first-token histogram empty (cheaper: alerts do not read it)."""
        since, total = math.floor(now - seconds), Rollup()
        whole_blocks_from = -(-since // BLOCK_S) * BLOCK_S
        for name, held in self._held.items():
            if model is None or name == model:
                for second, rollup in held.seconds.items():
                    if since <= second < whole_blocks_from:
                        total.merge(rollup, ttft=ttft)
                for block, rollup in held.blocks.items():
                    if block >= whole_blocks_from:
                        total.merge(rollup, ttft=ttft)
        return total

    def series(self, model: str, start: float, bucket_s: float, buckets: int) -> list[Rollup]:
        """``buckets`` consecutive rollups of ``bucket_s`` seconds from ``start`` (the dashboard's chart;
        no time-to-first-token)."""
        out = [Rollup() for _ in range(buckets)]
        held = self._held.get(model)
        for second, rollup in held.seconds.items() if held else ():
            i = int((second - start) // bucket_s)
            if 0 <= i < buckets:
                out[i].merge(rollup, ttft=False)
        return out

    def models(self) -> set[str]:
        return set(self._held)

    def count(self) -> int:
        """Requests held (every model, the whole horizon)."""
        return sum(r.requests for held in self._held.values() for r in held.seconds.values())

    def held(self) -> list[tuple[str, int, Rollup]]:
        """Every (model, second, rollup) held, in order: for comparing two monitors."""
        return sorted(
            ((m, s, r) for m, held in self._held.items() for s, r in held.seconds.items()), key=lambda item: item[:2]
        )

    def _forget_before(self, oldest: float) -> None:
        for model in list(self._held):
            held = self._held[model]
            for second in [s for s in held.seconds if s < oldest]:
                del held.seconds[second]
            for block in [b for b in held.blocks if b + BLOCK_S <= oldest]:
                del held.blocks[block]
            if not held.seconds:
                del self._held[model]
