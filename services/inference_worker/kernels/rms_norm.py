"""RMSNorm, plain and fused with the residual add (Llama convention).

One program normalises one row; the whole row sits in registers, so hidden sizes up to
~16K need a single pass over memory. The fused variant reads x and residual once, writes
the new residual and the normalised output, and never re-reads the sum from memory.
"""

from __future__ import annotations

import torch

from ._compat import HAS_TRITON, check_device, jit, tl, triton, tsum


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Exactly HF LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale.
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * hidden.to(x.dtype)).to(x.dtype)


def rms_norm_residual_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


if HAS_TRITON:

    @jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        weight_ptr,
        y_ptr,
        new_res_ptr,
        x_row_stride,
        res_row_stride,
        y_row_stride,
        new_res_row_stride,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
            # Round the sum to the input dtype, as `x + residual` does in torch.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(new_res_ptr + row * new_res_row_stride + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tsum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # HF rounds the normalised value to the input dtype before the weight multiply.
        normed = (xf * rstd).to(x.dtype).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t = t.reshape(-1, n_cols)  # a view whenever the layout allows one
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm expects x [..., H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"rms_norm expects a floating-point x, got {x.dtype}")
    check_device(x, weight)


def _launch(x, residual, weight, eps):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use rms_norm_ref")
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n_cols)
    if residual is None:
        r2, new_res, nr2 = x2, None, y2  # dummies: the HAS_RESIDUAL=False branch never touches them
    else:
        r2 = _as_rows(residual, n_cols)
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        nr2 = new_res.view(-1, n_cols)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, y2, nr2,
            x2.stride(0), r2.stride(0), y2.stride(0), nr2.stride(0),
            n_cols, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return y, new_res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, weight)
    return _launch(x, None, weight, eps)[0]


def rms_norm_residual_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x: got {tuple(residual.shape)} {residual.dtype}, "
            f"x is {tuple(x.shape)} {x.dtype}"
        )
    check_device(x, residual)
    return _launch(x, residual, weight, eps)
