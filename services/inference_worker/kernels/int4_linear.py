"""Weight-only int4 linear, grouped along K: each group of ``group_size`` input weights of a row has a
scale and a zero point, w ≈ (q - 8) * scale + zero with q in 0..15 (asymmetric; the layout of torch's
"tinygemm" int4 kernels, which torchao's int4 weight-only configs also use). Activations stay 16-bit.

CPU: torch's ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros
[K / group_size, N, 2])`` on the weight packed once by ``aten._convert_weight_to_int4pack_for_cpu``
(two nibbles a byte). Other devices: the reference below (dequantize, then one matmul), untested until
a GPU run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP_SIZE = 32  # as llama.cpp's Q4 blocks; a larger group is smaller and faster but less accurate


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int32 [N, K] in 0..15, fp32 scales_and_zeros [K / group_size, N, 2]): each group
    maps its [min, max] onto 0..15, rounding to nearest."""
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group_size}")
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero == lo + q * scale
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def int4_dequantize(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K / group_size, 2]
    w = (q.reshape(N, K // group_size, group_size).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(N, K)


def int4_linear_ref(x: torch.Tensor, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain torch definition: dequantize to x's dtype, then an ordinary linear."""
    return F.linear(x, int4_dequantize(q, scales_and_zeros, group_size).to(x.dtype), bias)


def int4_pack_cpu(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def int4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's fused CPU kernel on ``int4_pack_cpu``'s weight; scales_and_zeros in x's dtype."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), packed, group_size,
                                                   scales_and_zeros)
    y = y.reshape(*lead, y.shape[-1])
    return y if bias is None else y + bias
