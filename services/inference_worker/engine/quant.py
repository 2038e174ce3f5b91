"""Weight-only quantization of a loaded model's linear layers, chosen per deploy (``quantize``): int8
(per output channel, symmetric) or int4 (groups of 32 along the input, with a zero point).

Quantized: the decoder's q/k/v, o, gate/up and down projections (nn.Linear), where a decode step's
bytes are. Kept in the model dtype: embeddings, the output head (tied to the embedding in many models;
``compute_logits`` reads its weight directly), norms, MoE routers and stacked expert weights."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from shared.quantization import QUANTIZATIONS

from ..kernels.int4_linear import (GROUP_SIZE, int4_linear_cpu, int4_linear_ref, int4_pack_cpu,
                                   quantize_int4)
from ..kernels.int8_linear import int8_linear, quantize_int8
from .cpu_linear import gemv_ready

log = logging.getLogger(__name__)

# The nn.Linear modules that are quantized, by the last part of their name (see model.py).
QUANTIZED_LINEARS = ("qkv", "o", "gate_up", "down")


def parse_quantize(value: str | None) -> str | None:
    if value in (None, "", "none"):
        return None
    name = str(value).lower()
    if name not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {value!r}; use one of {', '.join(QUANTIZATIONS)} or none")
    return name


class Int8Linear(nn.Module):
    """An nn.Linear with int8 weights [N, K] and one scale per output row (in the model dtype, as the
    CPU kernel wants it). Buffers, not parameters: nothing trains them."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scales = quantize_int8(linear.weight.detach())
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.gemv = q.device.type == "cpu" and gemv_ready()

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias, gemv=self.gemv)


class Int4Linear(nn.Module):
    """An nn.Linear with int4 weights in groups of GROUP_SIZE along K (kernels/int4_linear.py). On CPU
    the weight is kept packed as torch's CPU kernel wants it (half a byte a weight); elsewhere unpacked
    (a byte a weight) for the reference path until a GPU kernel is added."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, sz = quantize_int4(linear.weight.detach())
        dtype, self.cpu = linear.weight.dtype, linear.weight.device.type == "cpu"
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, GROUP_SIZE
        self.register_buffer("qweight", int4_pack_cpu(q) if self.cpu else q.to(torch.uint8))
        self.register_buffer("scales_and_zeros", sz.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu:
            return int4_linear_cpu(x, self.qweight, self.scales_and_zeros.to(x.dtype), self.group_size, self.bias)
        return int4_linear_ref(x, self.qweight, self.scales_and_zeros, self.group_size, self.bias)


MODULES = {"int8": Int8Linear, "int4": Int4Linear}
assert set(MODULES) == set(QUANTIZATIONS)


def quantize_model(model: nn.Module, method: str | None) -> int:
    """Replace the decoder's linears in place; returns how many were replaced. int4 keeps a linear whose
    in_features is not a multiple of its group size in the model dtype (logged)."""
    method = parse_quantize(method)
    if method is None:
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS]
    kept = [name for name, m in targets if method == "int4" and m.in_features % GROUP_SIZE]
    if kept:
        log.warning("int4: %d linears kept in the model dtype (in_features not a multiple of %d): %s",
                    len(kept), GROUP_SIZE, ", ".join(kept[:4]))
    with torch.no_grad():
        for name, linear in targets:
            if name in kept:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, MODULES[method](linear))
    log.info("quantized %d linear layers to %s", len(targets) - len(kept), method)
    return len(targets) - len(kept)
