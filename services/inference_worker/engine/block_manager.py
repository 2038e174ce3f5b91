"""Paged KV cache bookkeeping: fixed-size blocks, a block table per sequence, a free list."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class CacheUsage:
    block_size: int
    bytes_per_block: int
    num_blocks: int
    used_blocks: int
    free_blocks: int

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

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
    """Hands out block ids. A sequence owns the blocks in its ``block_table``; block i holds its
    tokens [i * block_size, (i + 1) * block_size)."""

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0):
        self.num_blocks, self.block_size, self.bytes_per_block = num_blocks, block_size, bytes_per_block
        self.free_ids: deque[int] = deque(range(num_blocks))

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

    def free(self, seq: Sequence) -> None:
        self.free_ids.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def usage(self) -> CacheUsage:
        free = len(self.free_ids)
        return CacheUsage(self.block_size, self.bytes_per_block, self.num_blocks,
                          self.num_blocks - free, free)
