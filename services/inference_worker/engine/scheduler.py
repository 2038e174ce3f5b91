"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (max_num_batched_tokens). Running sequences go first, oldest first:
a decoding sequence takes 1 token, a sequence still in prefill takes the next chunk of its prompt.
Waiting sequences then join with what is left, so prefills and decodes share a step. When the
cache has no block for a running sequence, the newest running sequence is preempted: its blocks are
freed and it goes back to the head of the queue to be recomputed later (prompt + what it already
generated), keeping its output so far."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed, budget)
            while not self.bm.ensure(seq, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it was the newest and gave up its own blocks
            batch.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            # Reserve the whole prompt so a chunked prefill never stalls halfway.
            if not self.bm.ensure(seq, len(seq)):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
