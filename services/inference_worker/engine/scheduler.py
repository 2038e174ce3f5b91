"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (max_num_batched_tokens). Running sequences go first, oldest first:
a decoding sequence takes 1 token, a sequence still in prefill takes the next chunk of its prompt.
Waiting sequences then join with what is left, so prefills and decodes share a step. When the
cache has no block for a running sequence, the newest running sequence is preempted: its blocks are
freed and it goes back to the head of the queue to be recomputed later (prompt + what it already
generated), keeping its output so far.

With a sliding window on every layer (BlockManager.window), a sequence gives back the blocks that
left the window before it takes new ones, so it holds about a window's worth of blocks however long
it grows, and a prompt longer than the whole cache can run.

longrope (Phi-3) encodes a sequence with one set of factors up to original_max_position_embeddings
tokens and another past it, so a sequence that grows past that length has its cache re-encoded
once (``reencode_at``), as transformers' generate() does.
"""
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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 reencode_at: int | None = None):
        self.bm = block_manager
        self.reencode_at = reencode_at
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._encoded_short_of(seq):
                self.bm.free(seq)
                seq.num_computed = 0
            self.bm.free_outside_window(seq)
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
            seq.encoded_len = len(seq)
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if not self.bm.ensure(seq, self.reserve_tokens(len(seq))):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append(ScheduledSeq(seq, n))
            seq.encoded_len = len(seq)
            budget -= n
        return batch

    def reserve_tokens(self, num_tokens: int) -> int:
        """How many of its first tokens' blocks a sequence of ``num_tokens`` takes when admitted.

        The whole prompt, so a chunked prefill does not stall halfway. With a window, only the
        most it ever holds at once: a full chunk [c, c + budget) sees keys from c - window + 1,
        which spans at most blocks_for(window - 1 + budget) + 1 blocks (the +1: the span need
        not start on a block boundary). Later chunks reuse the blocks that slid out of the
        window, so the reservation usually, though not always, carries it to the end.
        """
        w = self.bm.window
        if w is None:
            return num_tokens
        return min(num_tokens, w - 1 + self.max_num_batched_tokens + self.bm.block_size)

    def _encoded_short_of(self, seq: Sequence) -> bool:
        """Whether the sequence has grown to ``reencode_at`` tokens with K/V in the cache that were
        computed while it was shorter."""
        return (self.reencode_at is not None and seq.num_computed > 0
                and seq.encoded_len < self.reencode_at <= len(seq))

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
