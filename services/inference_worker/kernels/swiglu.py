"""Gated MLP activation on a fused gate/up projection: out = act(gate) * up, where act is silu
(SwiGLU: Llama, Qwen, Mistral...) or tanh-approximated gelu (GeGLU: Gemma).

gate_up is [..., 2 * I], gate first, as produced by one matmul with the gate_proj and
up_proj weights concatenated. The kernel reads both halves once and writes [..., I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._compat import HAS_TRITON, jit, tl, triton


ACTIVATIONS = ("silu", "gelu_tanh")


def swiglu_ref(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation != "silu":
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    return F.silu(gate) * up


if HAS_TRITON:

    @jit
    def _swiglu_kernel(
        gu_ptr,
        out_ptr,
        gu_row_stride,
        out_row_stride,
        inter,
        GELU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * gu_row_stride + cols, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * gu_row_stride + inter + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        if GELU:  # 0.5 x (1 + tanh(z)) == x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
            z = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
            act = gf / (1.0 + tl.exp(-2.0 * z))
        else:
            act = gf / (1.0 + tl.exp(-gf))
        # Round the activation to the input dtype before the multiply, as `F.silu(gate) * up` does,
        # so fp16/bf16 results match torch instead of being merely close.
        act = act.to(g.dtype).to(tl.float32)
        out = act * u.to(tl.float32)
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_triton(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu expects gate_up [..., 2 * I], got shape {tuple(gate_up.shape)}")
    if not gate_up.is_floating_point():
        raise ValueError(f"swiglu expects a floating-point input, got {gate_up.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use swiglu_ref")
    inter = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * inter)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    out2 = out.view(-1, inter)
    block = min(triton.next_power_of_2(inter), 1024)
    grid = (gu.shape[0], triton.cdiv(inter, block))
    _swiglu_kernel[grid](gu, out2, gu.stride(0), out2.stride(0), inter, GELU=activation == "gelu_tanh", BLOCK=block)
    return out
