"""16-bit linears on CPU with their weights laid out, once, at load, for the kernel that streams them fastest.

torch's plain ``F.linear`` repacks (or walks unpacked) the weight on every call. On the 2-core AVX-512
VM of issue #24, streaming a decode step's weights from memory (bench/cpu_linear.py):
- bf16: plain about 10 GB/s at 1 row; prepacked for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``,
  the layout inductor's CPU freezing uses) about 10.5 GB/s at 1 to 8 rows; our own loops over plain
  rows (kernels/cpu_gemv.py: AVX-512 at 1 row, AMX past it) 14.4 GB/s at 1 row and 12.1 to 12.8 at 2 to
  8. So where those loops run (AVX-512 BF16 and a C++ compiler, or the library prebuilt) bf16 weights
  stay plain: the loops serve decode-sized products (up to cpu_gemv.MAX_ROWS rows) and ``F.linear`` the
  prefills, which pay about 1.25x for the plain layout at 16 to 256 rows. Elsewhere oneDNN's layout.
  (Without AMX the AVX-512 loop falls to 9–10 GB/s at 4 to 8 rows, below oneDNN.)
- fp16: plain runs a gemv at 1 row (fast) but falls to 2–5 GB/s at 4–8 rows; prepacked for fbgemm
  (``quantized.linear_prepack_fp16``: fp16 weights, fp32 activations and accumulation) about 22 GB/s
  at 1 row and 10–16 GB/s at 4–8.
Same values (bf16 stays bf16; fp16 stays fp16), same 2 bytes a weight; only the memory order differs.
Packing is paid once, at load: on that VM, under load, about 4 ns a weight for oneDNN's reorder and
about 20 ns for fbgemm's (a 254M-parameter model loaded in 2.5 s instead of 1.6 in bf16, in 7.2 s
instead of 1.3 in fp16).

Packed: the decoder's q/k/v, o, gate/up and down projections and an untied output head. Kept plain:
a tied output head (its weight is also the embedding table, which is gathered by row), MoE experts,
quantized linears (they have their own kernels).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import cpu_gemv

log = logging.getLogger(__name__)

PACKED_LINEARS = ("qkv", "o", "gate_up", "down", "lm_head")


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """bf16: oneDNN is built in and this CPU has native bf16 dot products (avx512_bf16 or AMX).
    fp16: torch is built with fbgemm (x86 with AVX2)."""
    try:
        if dtype == torch.bfloat16:
            return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if dtype == torch.float16:
            return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
                torch.ops.quantized, "linear_prepack_fp16")
    except (AttributeError, RuntimeError):  # a torch without these ops
        pass
    return False


def gemv_ready() -> bool:
    """Whether bf16 weights stay plain for our decode loop (kernels/cpu_gemv.py) rather than oneDNN's layout."""
    return cpu_gemv.unavailable() is None


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in the layout of the kernel that serves it: plain rows for
    kernels/cpu_gemv.py (bf16, where it runs), oneDNN's blocks (bf16 elsewhere), an fbgemm pack (fp16).
    ``nbytes`` is what it holds (the state dict does not see an fbgemm pack)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, w.dtype
        self.nbytes = w.numel() * w.element_size()
        self.gemv, self.fbgemm = False, None
        if w.dtype == torch.bfloat16:
            self.gemv = gemv_ready()
            packed = w.contiguous() if self.gemv else torch.ops.mkldnn._reorder_linear_weight(w, None)
            self.register_buffer("weight", packed)
            self.register_buffer("bias", None if b is None else b.clone())
        else:  # fbgemm takes fp32 and keeps fp16: the same values, since they came from fp16
            self.fbgemm = torch.ops.quantized.linear_prepack_fp16(w.float(), None if b is None else b.float())

            self.handle = len(_FBGEMM_PACKS)
            _FBGEMM_PACKS.append(self.fbgemm)

    def forward(self, x: Tensor) -> Tensor:
        if self.gemv:
            if cpu_gemv.fits(x):
                return cpu_gemv.gemv_bf16(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if self.fbgemm is None:
            return onednn_linear(x, self.weight, self.bias)
        return fbgemm_linear_fp16(x, self.handle, self.out_features)


# Both GEMM calls are custom ops so that torch.compile (engine/compiled_decode.py) keeps them as one
# opaque call each: inductor's own lowering of ``mkldnn._linear_pointwise`` rejects a weight reordered
# outside it, and an fbgemm pack is a torchbind object a graph cannot take as an input, so the op takes
# its index in _FBGEMM_PACKS instead (packs live as long as the process; a model is loaded once per
# worker process).
_FBGEMM_PACKS: list = []


@torch.library.custom_op("strata::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("strata::fbgemm_linear_fp16", mutates_args=())
def fbgemm_linear_fp16(x: Tensor, handle: int, out_features: int) -> Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x.float(), _FBGEMM_PACKS[handle]).to(x.dtype)


@fbgemm_linear_fp16.register_fake
def _(x, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def pack_model(model: nn.Module) -> int:
    """Replace the 16-bit CPU nn.Linear layers named in PACKED_LINEARS in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in PACKED_LINEARS
               and m.weight.device.type == "cpu" and can_pack(m.weight.dtype)]
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PackedLinear(linear))
    if targets:
        log.info("prepacked %d %s linear layers", len(targets), str(targets[0][1].weight.dtype).removeprefix("torch."))
    return len(targets)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: the state dict (quantized weights and their scales are
    buffers; a tensor shared under two names counts once) plus what fbgemm packs hold."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total + sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear) and m.fbgemm is not None)
