"""What a loaded model really uses: measured around the load and the warm-up, not predicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.events import MeasuredMemory


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class MemoryProbe:
    """Start before loading, ``measure`` after the warm-up. Loads must not overlap (the worker loads
    one model at a time), or one load's allocations would be counted in the other's figures."""

    device: torch.device
    rss_before: int = 0
    cuda_before: int = 0

    def start(self) -> MemoryProbe:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_before = rss_bytes()
        return self

    def measure(self, weights_bytes: int, kv_cache_bytes: int) -> MeasuredMemory:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            # The peak over load + KV allocation + warm-up, as torch's allocator saw it (the engine's
            # own profiling pass runs inside that window, so its activations count too).
            peak = torch.cuda.max_memory_allocated(self.device) - self.cuda_before
            return MeasuredMemory(weights=weights_bytes, kv_cache=kv_cache_bytes,
                                  peak=max(peak, weights_bytes + kv_cache_bytes))
        # On CPU, torch.zeros writes every page of the KV cache, so the RSS delta over load +
        # warm-up already holds it (measured: a 64 MiB cache raised RSS by ~66 MiB); adding the
        # cache on top would count it twice. The tensor bytes are the floor, should the allocator
        # have reused freed memory (a second model after an unload).
        delta = max(0, rss_bytes() - self.rss_before)
        return MeasuredMemory(weights=weights_bytes, kv_cache=kv_cache_bytes,
                              peak=max(delta, weights_bytes + kv_cache_bytes))
