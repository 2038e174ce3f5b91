"""Weight-only quantization of a loaded model's linear layers, chosen per deploy (``quantize``).

Quantized: the decoder's q/k/v, o, gate/up and down projections (nn.Linear), where a decode step's
bytes are. Kept in the model dtype: embeddings, the output head (tied to the embedding in many models;
``compute_logits`` reads its weight directly), norms, MoE routers and stacked expert weights."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..kernels.int8_linear import int8_linear, quantize_int8

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
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

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)


def quantize_model(model: nn.Module, method: str | None) -> int:
    """Replace the decoder's linears in place; returns how many were replaced."""
    method = parse_quantize(method)
    if method is None:
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS]
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Int8Linear(linear))
    log.info("quantized %d linear layers to %s (per-output-channel symmetric weights)", len(targets), method)
    return len(targets)
