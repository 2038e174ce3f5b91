"""What bench/engine.py measures against: the device's copy bandwidth, the bytes one decode step must
read, and timing helpers that are honest about asynchronous devices."""
from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device="cuda", iters: int = 50) -> float:
    """Median milliseconds of fn(): CUDA events (triton's do_bench when importable), or the host
    clock on CPU."""
    if torch.device(device).type != "cuda":
        fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)


def copy_bandwidth_gbs(device) -> tuple[float, str]:
    """The device's memory bandwidth as a device-to-device copy achieves it (bytes read + bytes
    written per second, GB/s), and how it was measured. 1 GiB on CUDA (far past L2); 256 MiB on
    CPU (past the last-level cache, small enough for a shared box)."""
    cuda = torch.device(device).type == "cuda"
    n = (1 << 30) if cuda else (256 << 20)
    src = torch.full((n,), 0x5A, dtype=torch.uint8, device=device)  # touched, and not zeros
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=50 if cuda else 10)
    how = (f"device-to-device copy of {n >> 20} MiB, read + write, median "
           f"{'(CUDA events)' if cuda else '(host clock)'}")
    return 2 * n / ms / 1e6, how


def weight_bytes_read_per_step(model: nn.Module, tied_embeddings: bool, experts_read: float = 1.0
                               ) -> tuple[int, int]:
    """(bytes of weights one decode step reads, bytes of the embedding tables). Every parameter is
    read once per step except an embedding table, which is only gathered (one row per token) — unless
    it is tied to the output projection, which reads it whole; shared parameters count once. Stacked
    expert weights (3-D) count ``experts_read`` of their bytes: top_k / experts for one token."""
    seen, total = set(), 0
    # the state dict, not parameters(): weight-only quantized weights and their scales are buffers
    # (engine/quant.py); a tied tensor is the same object under both names and counts once
    for p in model.state_dict(keep_vars=True).values():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size() * (experts_read if p.dim() == 3 else 1)
    # an fbgemm fp16 pack (engine/cpu_linear.py) is not in the state dict
    total += sum(getattr(m, "nbytes", 0) for m in model.modules() if getattr(m, "fbgemm", None) is not None)
    embed = sum(m.weight.numel() * m.weight.element_size()
                for m in model.modules() if isinstance(m, nn.Embedding))
    return int(total if tied_embeddings else total - embed), embed


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """KV cache bytes one context position holds (K and V of every layer)."""
    return 2 * layers * kv_heads * head_dim * elem


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on sorted data; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]
