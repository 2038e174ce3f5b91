"""Triton kernels for the inference engine, each with a plain-torch reference.

The dispatchers below run the Triton kernel for CUDA tensors when Triton is importable and
the torch reference otherwise, so the engine runs unchanged on CPU-only machines.
Set ``STRATA_KERNELS=torch`` to force the references on CUDA as well (for debugging).
"""

from __future__ import annotations

import os

import torch

from ._compat import HAS_TRITON
from .paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from .rms_norm import (
    rms_norm_ref,
    rms_norm_residual_ref,
    rms_norm_residual_triton,
    rms_norm_triton,
)
from .rope import rope_ref, rope_triton
from .swiglu import swiglu_ref, swiglu_triton

_FORCE_TORCH = os.environ.get("STRATA_KERNELS", "").lower() == "torch"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernels."""
    return HAS_TRITON and not _FORCE_TORCH and t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_triton(x, weight, eps) if use_triton(x) else rms_norm_ref(x, weight, eps)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return rms_norm_residual_triton(x, residual, weight, eps)
    return rms_norm_residual_ref(x, residual, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_triton(x, cos, sin) if use_triton(x) else rope_ref(x, cos, sin)


def swiglu(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    fn = swiglu_triton if use_triton(gate_up) else swiglu_ref
    return fn(gate_up, activation)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    fn = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_ref
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, window=window, softcap=softcap)


__all__ = [
    "HAS_TRITON",
    "use_triton",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
    "rms_norm_residual",
    "rms_norm_residual_ref",
    "rms_norm_residual_triton",
    "rope",
    "rope_ref",
    "rope_triton",
    "swiglu",
    "swiglu_ref",
    "swiglu_triton",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_decode_attention_triton",
]
