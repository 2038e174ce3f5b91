"""bf16 linears on CPU with their weights prepacked once, at load, in oneDNN's blocked layout.

torch's plain ``F.linear`` in bf16 repacks (or walks unpacked) the weight on every call: on the
2-core AVX-512 VM of issue #24 it streamed a decode step's weights at about 10 GB/s at batch 1, where
the same product on a prepacked weight (``torch.ops.mkldnn._reorder_linear_weight``, the layout
inductor's CPU freezing uses) streamed 15 GB/s, and 13–19 GB/s at 4–8 rows (bench/cpu_linear.py).
Same bytes, same bf16 math with fp32 accumulation; only the memory order differs.

Packed: the decoder's q/k/v, o, gate/up and down projections and an untied output head. Kept plain:
a tied output head (its weight is also the embedding table, which is gathered by row), MoE experts,
quantized linears (they have their own kernels).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PACKED_LINEARS = ("qkv", "o", "gate_up", "down", "lm_head")


@functools.cache
def can_pack() -> bool:
    """oneDNN is built in and this CPU has native bf16 dot products (avx512_bf16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without these private ops
        return False


def pack_weight(weight: Tensor) -> Tensor:
    """[N, K] bf16 -> the same values in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in oneDNN's layout. ``weight`` is that opaque tensor: it has a
    shape, dtype and byte count, but no strided storage to index."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", pack_weight(linear.weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight, self.bias)


def pack_model(model: nn.Module) -> int:
    """Replace the bf16 CPU nn.Linear layers named in PACKED_LINEARS in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in PACKED_LINEARS
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16]
    if not targets or not can_pack():
        return 0
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PackedLinear(linear))
    log.info("prepacked %d bf16 linear layers for oneDNN", len(targets))
    return len(targets)
