"""Rotary position embedding, HF "rotate_half" layout (not interleaved).

cos/sin arrive already gathered per token, [T, head_dim // 2], so the same kernel serves
prefill (many positions) and decode (one per sequence) and any RoPE scaling scheme: the
scaling lives in how the caller builds cos/sin. x may be a strided view (e.g. q or k sliced
out of a fused qkv projection); the kernel reads it in place and writes a new contiguous tensor.
"""

from __future__ import annotations

import torch

from ._compat import HAS_TRITON, check_device, jit, tl, triton


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos.float()[:, None, :]  # broadcast over heads
    s = sin.float()[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


if HAS_TRITON:

    @jit
    def _rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        x_stride_t,
        x_stride_h,
        cs_stride_t,
        out_stride_t,
        out_stride_h,
        n_heads,
        half,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        cols = tl.arange(0, BLOCK_HALF)
        col_mask = cols < half
        mask = (heads[:, None] < n_heads) & col_mask[None, :]

        # cos/sin are loaded once per token and shared by all heads of the block.
        c = tl.load(cos_ptr + t * cs_stride_t + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * cs_stride_t + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

        x_off = t * x_stride_t + heads[:, None] * x_stride_h + cols[None, :]
        x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)

        o_off = t * out_stride_t + heads[:, None] * out_stride_h + cols[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_off, (x1 * c - x2 * s).to(ty), mask=mask)
        tl.store(out_ptr + o_off + half, (x2 * c + x1 * s).to(ty), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"rope expects x [T, n_heads, head_dim], got shape {tuple(x.shape)}")
    T, _, d = x.shape
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, d // 2):
            raise ValueError(f"rope expects {name} of shape {(T, d // 2)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"rope expects floating-point {name}, got {t.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"rope expects a floating-point x, got {x.dtype}")
    check_device(x, cos, sin)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use rope_ref")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    T, n_heads, d = x.shape
    half = d // 2
    out = torch.empty((T, n_heads, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_half = triton.next_power_of_2(half)
    # Enough heads per program to amortise the cos/sin load, few enough to stay in registers.
    block_heads = min(triton.next_power_of_2(n_heads), max(1, 2048 // block_half))
    grid = (T, triton.cdiv(n_heads, block_heads))
    _rope_kernel[grid](
        x, cos, sin, out,
        x.stride(0), x.stride(1), cos.stride(0),
        out.stride(0), out.stride(1),
        n_heads, half,
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
    )
    return out
