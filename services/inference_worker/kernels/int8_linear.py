"""Weight-only int8 linear: y = x @ (w_int8 * scale[:, None]).T + bias, with one symmetric scale per
output channel (row of the [N, K] weight). Activations stay in 16 (or 32) bits.

CPU: decode-sized products (up to cpu_gemv.MAX_ROWS rows of bf16) run our own loop where it is built
(kernels/cpu_gemv.py): on the 2-core AVX-512 VM of issue #24 it streamed int8 weights at 10.4 GB/s at
1 row and 7.7 at 8, against 5.8 and 2.5 for torch's kernel. Everything else runs torch's
``aten._weight_int8pack_mm(x [M, K], w [N, K] int8, scales [N])``, which dequantizes inside the matmul,
so a decode step reads one byte per weight instead of two. Measured on the same VM (torch 2.13): fast
with bf16 activations (batch 1 at the speed of a bf16 matvec of half the bytes), but ~10x slower than
bf16 with fp16 or fp32 activations, which is why a quantized deploy computes in bf16 on CPU
(engine/dtypes.py). Both take the same [N, K] int8 layout.
CUDA: the reference below (dequantize, then one matmul) until a Triton kernel or torchao's is added;
correct but not faster, and untested until a GPU run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_gemv


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scales [N]): symmetric, per output channel, round to nearest.
    A row of zeros gets scale 1 (not 0) so that nothing divides by zero."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain torch definition: dequantize to x's dtype, then an ordinary linear."""
    w = (qweight.float() * scales.float()[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


def int8_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's fused CPU kernel; ``scales`` must already be in x's dtype (the op requires it)."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), qweight, scales)
    y = y.reshape(*lead, qweight.shape[0])
    return y if bias is None else y + bias


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None, *, gemv: bool = False) -> torch.Tensor:
    """``gemv``: the caller has checked that kernels/cpu_gemv.py runs here (once, at load)."""
    if gemv and cpu_gemv.fits(x):
        return cpu_gemv.gemv_int8(x, qweight, scales.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if x.device.type == "cpu":
        return int8_linear_cpu(x, qweight, scales.to(x.dtype), bias)
    return int8_linear_ref(x, qweight, scales, bias)
