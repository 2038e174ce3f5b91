"""A request's state inside the engine, and what the engine reports about it."""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import SamplingParams, TokenLogprob
from .tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) and counts; the properties give the usual latencies."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class StreamEvent:
    """What a request's callback receives: the tokens and text added since the previous event."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop", "length", "cancelled", "error"
    error: str | None
    metrics: RequestMetrics


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    error: str | None
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics


Callback = Callable[[StreamEvent], None]


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 eos_ids: set[int], detok: IncrementalDetokenizer | None,
                 callback: Callback | None, generator: torch.Generator | None, matcher=None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detok = detok
        self.callback = callback
        self.generator = generator
        self.matcher = matcher  # llguidance's, when params.constraint is set: fed every sampled token
        self.mask_seconds: float | None = None  # set when a step's mask took over guided.MASK_BUDGET_S
        self.status = Status.WAITING
        # entry i: the block of tokens [i * block_size, (i + 1) * block_size); NULL_BLOCK once freed
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.encoded_len = 0  # the sequence's length when its cached K/V were last computed
        self.text = ""  # decoded output, cut at a stop string when one is hit
        self.emitted_chars = 0  # how much of self.text the callback has seen
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.time(), num_prompt_tokens=len(prompt_ids))
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._pending_ids: list[int] = []
        self._pending_lps: list[TokenLogprob] = []
        self._checked = 0  # text length already searched for stop strings

    @property
    def tokens(self) -> list[int]:
        """Everything that must be in the cache to generate the next token (recompute after
        preemption re-prefills the generated tokens as if they were prompt)."""
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        P = len(self.prompt_ids)
        if end <= P:
            return self.prompt_ids[start:end]
        if start >= P:
            return self.output_ids[start - P:end - P]
        return self.prompt_ids[start:] + self.output_ids[:end - P]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int, logprob: TokenLogprob | None, max_len: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        now = time.time()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.output_ids.append(token_id)
        self.metrics.num_generated_tokens = len(self.output_ids)
        self._pending_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
            self._pending_lps.append(logprob)
        if self.matcher is not None and (self.matcher.is_error() or self.mask_seconds is not None):
            self._grammar_failed()  # a limit hit while masking (the mask then allows only EOS): not a "stop"
            return
        if token_id in self.stop_ids:
            self.finish("stop")  # the stop token is kept in token_ids, never in text
            return
        if self.detok is not None:
            self.text += self.detok.add(token_id)
            if self._check_stop_strings():
                return
        if self.matcher is not None and self._grammar_done(token_id):
            return
        if self.params.max_tokens is not None and len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")
        elif len(self) >= max_len:
            self.finish("length")

    def _grammar_done(self, token_id: int) -> bool:
        """Feed the token to the grammar; finish when it can take no more text ("stop"), or when it
        refused the token, which the mask should have made impossible ("error", not a silent pass)."""
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            self._grammar_failed()
            return True
        if self.matcher.is_stopped():
            self.finish("stop")
            return True
        return False

    def _grammar_failed(self) -> None:
        if self.mask_seconds is not None:
            error = f"its grammar's token mask took {self.mask_seconds * 1e3:.0f} ms in one step, over the budget"
        else:
            error = (self.matcher.get_error() or "the token was refused").strip().splitlines()[0][:300]
        self.finish("error", error=f"constrained decoding failed: {error}")

    def _check_stop_strings(self) -> bool:
        """Cut the text at the first stop string and finish; True when one was found."""
        hits = [i for i in (self.text.find(s, max(0, self._checked - len(s) + 1))
                            for s in self.params.stop) if i >= 0]
        self._checked = len(self.text)
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.finish("stop", flush=False)
        return True

    def finish(self, reason: str, error: str | None = None, flush: bool = True) -> None:
        if self.finished:
            return
        if flush and self.detok is not None:  # a last partial character, if any
            self.text += self.detok.flush()
            if self._check_stop_strings():
                return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        self.metrics.finish_time = time.time()

    def take_event(self) -> StreamEvent | None:
        """The delta since the last event. While running, text that could still turn out to be the
        start of a stop string is held back, so a stop string never reaches the client."""
        visible = len(self.text) if self.finished else max(self.emitted_chars,
                                                           len(self.text) - self._holdback)
        if not (self._pending_ids or visible > self.emitted_chars or self.finished):
            return None
        ev = StreamEvent(self.request_id, self._pending_ids, self.text[self.emitted_chars:visible],
                         self._pending_lps, self.finished, self.finish_reason, self.error, self.metrics)
        self.emitted_chars = visible
        self._pending_ids, self._pending_lps = [], []
        return ev

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_ids, list(self.output_ids), self.text,
                             self.finished, self.finish_reason, self.error,
                             None if self.logprobs is None else list(self.logprobs), self.metrics)

    def stream(self) -> None:
        """Send the delta since the last event to the request's callback; a callback that raises is
        logged and ignored, so one client's bug never takes the engine's step down."""
        event = self.take_event()
        if event is not None and self.callback is not None:
            try:
                self.callback(event)
            except Exception:
                log.exception("stream callback of %s raised; ignoring", self.request_id)
