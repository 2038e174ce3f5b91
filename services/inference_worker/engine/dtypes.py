"""Which dtype the engine computes in when the deploy does not say.

* CUDA: the checkpoint's 16-bit dtype (bf16 for an fp32 checkpoint).
* CPU, 16-bit checkpoint: the 16-bit dtype this node multiplies fastest (``fastest_cpu_half``), since
  a decode step is matrix-vector products and torch's CPU speed differs by dtype and by batch: on the
  2-core AVX-512 VM of issue #24, fp16 ran a batch-1 product at full bandwidth and bf16 at half, while
  at 8 rows fp16 fell to a fifth of bf16. Both are 2 bytes, so fit's booking is the same either way.
* CPU, weight-only quantized: bf16, the only activation dtype torch's int8 CPU kernel is fast with
  (kernels/int8_linear.py).
* CPU, fp32 checkpoint: fp32. fp32 otherwise only on request (an explicit ``dtype``).
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from .config import ModelConfig

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)


def default_dtype(cfg: ModelConfig, device: torch.device, quantize: str | None = None) -> torch.dtype:
    if device.type == "cuda":
        return cfg.torch_dtype if cfg.torch_dtype in HALF else torch.bfloat16
    if quantize:
        return torch.bfloat16
    return fastest_cpu_half() if cfg.torch_dtype in HALF else torch.float32


@functools.cache
def fastest_cpu_half() -> torch.dtype:
    """Measured once per process (the worker is one process per node; about 0.1 s), kept in memory:
    a [rows, 2048] x [2048, 2048] product at 1 row (one decode) and at 8 rows (a batch of decodes),
    best of 5 each, in fp16 and in bf16; the lower sum of the two wins. Logged with the timings."""
    seconds = {dt: sum(_matmul_seconds(dt, rows) for rows in (1, 8)) for dt in HALF}
    best = min(seconds, key=seconds.get)
    log.info("CPU 16-bit dtype for this node: %s (matmul probe, 1 + 8 rows: %s; torch threads %d)",
             str(best).removeprefix("torch."),
             ", ".join(f"{str(d).removeprefix('torch.')} {s * 1e3:.2f} ms" for d, s in seconds.items()),
             torch.get_num_threads())
    return best


def _matmul_seconds(dtype: torch.dtype, rows: int, size: int = 2048, reps: int = 5) -> float:
    w = torch.randn(size, size).to(dtype)
    x = torch.randn(rows, size).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: first-call dispatch and packing
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best
