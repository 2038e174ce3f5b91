"""Which dtype the engine computes in when the deploy does not say.

* CUDA: the checkpoint's 16-bit dtype (bf16 for an fp32 checkpoint).
* CPU, 16-bit checkpoint: the 16-bit dtype this node multiplies fastest (``fastest_cpu_half``), since
  a decode step is matrix-vector products and torch's CPU speed differs by dtype and by batch: on the
  2-core AVX-512 VM of issue #24, plain fp16 ran a batch-1 product at full bandwidth and plain bf16 at
  half, while at 8 rows fp16 fell to a fifth of bf16; with weights prepacked (cpu_linear.py) both
  are within a factor 1.5 of each other at 1 and 8 rows, so the probe decides. Both are 2 bytes, so fit's
  booking is the same either way.
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
from .cpu_linear import PackedLinear, can_pack

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
    """Measured once per process (the worker is one process per node; well under a second), kept in
    memory: products of 1 row (one decode) and 8 rows (a batch of decodes) against 64 MB of weights,
    more than a server CPU's last-level cache, so the product streams them from memory as a decode
    step does, in fp16 and in bf16, each prepacked where the engine will prepack it (cpu_linear.py),
    best of 3 each; the lower sum of the two wins. Logged with the timings."""
    seconds = {dt: _matmul_seconds(dt) for dt in HALF}
    best = min(seconds, key=seconds.get)
    log.info(
        "CPU 16-bit dtype for this node: %s (matmul probe, 1 + 8 rows over 64 MB: %s; torch threads %d)",
        str(best).removeprefix("torch."),
        ", ".join(f"{str(d).removeprefix('torch.')} {s * 1e3:.2f} ms" for d, s in seconds.items()),
        torch.get_num_threads(),
    )
    return best


def _matmul_seconds(dtype: torch.dtype, size: int = 4096, count: int = 2, reps: int = 3) -> float:
    """Best-of-reps seconds of a 1-row plus an 8-row pass over ``count`` [size, size] linears, each
    as the engine will run it (cpu_linear.py)."""
    linears = []
    for _ in range(count):
        linear = torch.nn.Linear(size, size, bias=False, dtype=dtype, device="meta").to_empty(device="cpu")
        linear.requires_grad_(False)
        linear.weight.fill_(0.01)  # the values do not matter, only that every page is touched
        linears.append(PackedLinear(linear) if can_pack(dtype) else linear)
    total = 0.0
    for rows in (1, 8):
        x = torch.randn(rows, size).to(dtype)
        linears[0](x)  # warm-up: first-call dispatch
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for linear in linears:
                linear(x)
            best = min(best, time.perf_counter() - t0)
        total += best
    return total
