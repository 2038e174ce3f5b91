"""Paged KV cache bookkeeping: fixed-size blocks, a block table per sequence, a free list.

Block 0 of the cache tensor is the null block: never handed out, never written, so it stays
zeros. A block table entry whose tokens have slid out of every layer's attention window is
freed and replaced by the null block, so the table keeps mapping position -> block and a gather
of such an entry reads zeros, never another sequence's data or NaN. (Padding of the decode
block tables is 0 for the same reason.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Sequence

NULL_BLOCK = 0


def freeing_window(layer_windows: list[int | None]) -> int | None:
    """The window a block must be wholly outside of before it can be freed: every layer's, so
    none when any layer attends globally (Gemma 2/3 interleave such layers)."""
    if not layer_windows or any(w is None for w in layer_windows):
        return None
    return max(layer_windows)


@dataclass(frozen=True)
class CacheUsage:
    """``num_blocks`` counts the blocks sequences can use. The cache tensor holds one more, the
    null block, which is no capacity but does take memory: ``total_bytes`` includes it."""
    block_size: int
    bytes_per_block: int
    num_blocks: int
    used_blocks: int
    free_blocks: int

    @property
    def total_bytes(self) -> int:
        return (self.num_blocks + 1) * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block

    @property
    def token_capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class BlockManager:
    """Hands out block ids 1..num_blocks (the cache has num_blocks + 1 blocks; 0 is the null
    block). A sequence owns the blocks in its ``block_table``; entry i holds its tokens
    [i * block_size, (i + 1) * block_size), or is NULL_BLOCK once those left the window.

    ``window``: see ``freeing_window``; None frees nothing before the sequence ends."""

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0,
                 window: int | None = None):
        self.num_blocks, self.block_size, self.bytes_per_block = num_blocks, block_size, bytes_per_block
        self.window = window
        self.free_ids: deque[int] = deque(range(NULL_BLOCK + 1, num_blocks + 1))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def can_hold(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` could grow to ``num_tokens`` cached tokens with the blocks that are free."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self.free_ids)

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens. All or nothing."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self.free_ids):
            return False
        for _ in range(max(need, 0)):
            seq.block_table.append(self.free_ids.popleft())
        return True

    def free_outside_window(self, seq: Sequence) -> int:
        """Free the blocks no future query of ``seq`` can see; returns how many were freed.

        The next query is at position seq.num_computed (a chunk starting there, or a decode), and
        every later one is further right, so keys before num_computed - window + 1 are dead. Freed
        entries always form a prefix of the table, so walk back from the last dead block to the
        first already freed one.
        """
        if self.window is None:
            return 0
        dead = max(seq.num_computed - self.window + 1, 0) // self.block_size  # blocks wholly dead
        table, freed = seq.block_table, 0
        for i in range(min(dead, len(table)) - 1, -1, -1):
            if table[i] == NULL_BLOCK:
                break
            self.free_ids.append(table[i])
            table[i] = NULL_BLOCK
            freed += 1
        return freed

    def free(self, seq: Sequence) -> None:
        self.free_ids.extend(b for b in seq.block_table if b != NULL_BLOCK)
        seq.block_table = []
        seq.num_computed = 0

    def usage(self) -> CacheUsage:
        free = len(self.free_ids)
        return CacheUsage(self.block_size, self.bytes_per_block, self.num_blocks,
                          self.num_blocks - free, free)
