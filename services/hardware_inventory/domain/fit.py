"""The memory-fit model: how many bytes a model needs on a device for a context length and batch.

    need = weights + KV cache + activations + workspace

* weights: the checkpoint's tensor bytes, rescaled when the device computes in another dtype (the
  worker serves a 16-bit checkpoint in 16 bits and an fp32 one in fp32 unless told otherwise); for an
  MoE model that is every expert's weights, all resident though a token uses a few; with weight-only
  ``quantize`` the decoder's dense linears count one byte a weight plus a scale per output row (int8) or
  half a byte plus a scale and a zero per 32 weights (int4) (``quantized_linears``; the worker's
  engine/quant.py quantizes exactly those);
* KV cache: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes per token, for
  ``context x batch`` tokens rounded up to whole paged-cache blocks;
* activations: the peak of one engine step, i.e. a prefill chunk of up to ``max_batched_tokens``
  tokens through one decoder layer (residual, norm, q/k/v, attention out, gate/up/act of the MLP;
  of an MoE layer, a copy of the token's row per expert it goes to, their outputs, one expert's
  gate/up/act at a time and the router's logits: ``mlp_width``) plus the logits and softmax of up
  to ``max_num_seqs`` rows;
* workspace: a fixed allowance per device kind for library workspaces and allocator slack.

The figure is what the deployment allocates on the device (``torch.cuda.max_memory_allocated`` on
CUDA), the same figure the worker reports as ``measured.peak``. A booking adds ``runtime_overhead``
(the CUDA context, or the process's own RSS on CPU), which no allocator statistic shows.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from shared.architectures import RUNTIMES, runtime_for, unsupported_reason
from shared.errors import Invalid
from shared.inventory import DeviceKind, FitEstimate, ModelShape
from shared.quantization import QUANTIZATIONS

MiB = 1 << 20
GiB = 1 << 30

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "f32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "f16": 2, "half": 2,
    "float8_e4m3fn": 1, "f8_e4m3": 1, "fp8": 1, "int8": 1, "i8": 1, "u8": 1, "uint8": 1,
}
CANONICAL_DTYPE = {2: "bfloat16", 4: "float32", 1: "int8"}
WORKSPACE = {"cuda": 256 * MiB, "cpu": 64 * MiB}
RUNTIME_OVERHEAD = {"cuda": 512 * MiB, "cpu": 512 * MiB}


def dtype_name(dtype: str) -> str:
    """A dtype spelled as safetensors, torch or HF spell it (BF16, torch.bfloat16, bf16) -> one name."""
    key = dtype.strip().lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise Invalid(f"unsupported dtype {dtype!r}; known: {', '.join(sorted(set(DTYPE_BYTES)))}")
    return {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16", "fp32": "float32",
            "f32": "float32", "float": "float32", "f8_e4m3": "float8_e4m3fn", "fp8": "float8_e4m3fn",
            "i8": "int8", "u8": "uint8"}.get(key, key)


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype_name(dtype)]


def refusal(meta: object) -> str | None:
    """Why nothing could serve the model, whatever its memory (None when something can): the runtime push
    recorded when it names one this platform has, else its architecture looked up in shared/architectures.py
    now (runtime null at push, or a manifest from before the field: the engine may have learnt it since)."""
    if getattr(meta, "runtime", None) in RUNTIMES:
        return None
    architecture = meta.architecture
    return None if runtime_for([architecture]) else unsupported_reason([architecture])


def shape_from_metadata(meta: object) -> ModelShape:
    """From a ``shared.catalog.ModelMetadata``; Invalid names every figure the checkpoint lacks."""
    get = lambda name: getattr(meta, name, None)  # noqa: E731
    missing = [
        n
        for n in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "vocab_size", "context_length")
        if get(n) is None
    ]
    if missing:
        raise Invalid(f"model metadata lacks {', '.join(missing)}: cannot predict its memory")
    num_heads = get("num_heads")
    head_dim = get("head_dim") or get("hidden_size") // num_heads
    gguf = get("format") == "gguf"  # its dtype is a ggml type (Q8_0, Q4_K), counted as stored by fit_gguf
    return ModelShape(
        architecture=get("architecture"),
        dtype=get("dtype") if gguf else dtype_name(get("dtype")),
        parameters=get("parameters"),
        weight_bytes=get("weight_bytes"),
        num_layers=get("num_layers"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_heads=num_heads,
        num_kv_heads=get("num_kv_heads") or num_heads,
        head_dim=head_dim,
        vocab_size=get("vocab_size"),
        context_length=get("context_length"),
        num_experts=get("num_experts"),
        num_experts_per_tok=get("num_experts_per_tok"),
        expert_intermediate_size=get("moe_intermediate_size") or get("intermediate_size"),
        format=get("format"),
    )


class FitParams(BaseModel):
    """The engine settings the prediction assumes (the worker's EngineConfig defaults)."""

    model_config = ConfigDict(frozen=True)
    block_size: int = Field(default=16, ge=1)
    max_batched_tokens: int = Field(default=4096, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)


# weight-only quantization (the worker's engine/quant.py): bytes a quantized weight, and the elements in
# the compute dtype it adds per weight (int4: a scale and a zero per group of 32) and per output row
# (int8: one scale)
QUANTIZE = {"int8": (1.0, 0.0, 1), "int4": (0.5, 2 / 32, 0)}
assert set(QUANTIZE) == set(QUANTIZATIONS)


def compute_dtype(
    shape: ModelShape, device_kind: DeviceKind, dtype: str | None = None, quantize: str | None = None
) -> str:
    """The dtype a worker computes in: as asked; else on CUDA the checkpoint's (sent to the worker as
    such); on CPU as the worker's engine/dtypes.py picks when the event leaves it open: a 16-bit
    checkpoint in 16 bits (fp16 or bf16, the same bytes), bf16 when quantized, else float32."""
    if dtype:
        return dtype_name(dtype)
    if device_kind == "cuda" or dtype_bytes(shape.dtype) == 2:
        return shape.dtype
    return "bfloat16" if quantize else "float32"


def quantize_name(quantize: str | None) -> str | None:
    if quantize in (None, "", "none"):
        return None
    if quantize.lower() not in QUANTIZE:
        raise Invalid(f"unsupported quantization {quantize!r}; known: {', '.join(QUANTIZE)}")
    return quantize.lower()


def quantized_linears(shape: ModelShape) -> tuple[int, int]:
    """(weights, output rows) of the linears weight-only quantization replaces: each layer's q/k/v, o
    and, in a dense layer, gate/up and down (MoE experts, embeddings, the output head stay as they are)."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    weights = shape.hidden_size * (q + 2 * kv) + q * shape.hidden_size
    rows = q + 2 * kv + shape.hidden_size
    if not shape.moe:
        weights += 3 * shape.hidden_size * shape.intermediate_size
        rows += 2 * shape.intermediate_size + shape.hidden_size
    return shape.num_layers * weights, shape.num_layers * rows


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes(dtype)


def predict(
    shape: ModelShape,
    device_kind: DeviceKind,
    *,
    context_length: int | None = None,
    batch: int = 1,
    dtype: str | None = None,
    quantize: str | None = None,
    params: FitParams = FitParams(),
) -> FitEstimate:
    if shape.format == "gguf":
        from services.hardware_inventory.domain.fit_gguf import predict_gguf

        return predict_gguf(shape, device_kind, context_length=context_length, batch=batch, dtype=dtype)
    if batch < 1:
        raise Invalid(f"batch must be >= 1, got {batch}")
    context = context_length or shape.context_length
    if context < 1:
        raise Invalid(f"context length must be >= 1, got {context}")
    if context > shape.context_length:
        raise Invalid(f"context length {context} exceeds the model's maximum of {shape.context_length}")
    quantize = quantize_name(quantize)
    run_dtype = compute_dtype(shape, device_kind, dtype, quantize)
    size = dtype_bytes(run_dtype)
    weights = math.ceil(shape.weight_bytes * size / dtype_bytes(shape.dtype))
    if quantize:
        n, rows = quantized_linears(shape)
        n = min(n, shape.weight_bytes // dtype_bytes(shape.dtype))  # a shape whose figures disagree: never below zero
        per_weight, extra_per_weight, extra_per_row = QUANTIZE[quantize]
        weights += math.ceil(n * (per_weight + extra_per_weight * size)) + rows * extra_per_row * size - n * size
    per_token = kv_bytes_per_token(shape, run_dtype)
    # + 1: the engine's null block (never handed out, see engine/block_manager.py) comes out of the
    # same cache, so without it a full-length sequence would not fit what was booked
    blocks = batch * math.ceil(context / params.block_size) + 1
    kv_cache = per_token * blocks * params.block_size
    return FitEstimate(
        device_kind=device_kind,
        dtype=run_dtype,
        quantize=quantize,
        context_length=context,
        batch=batch,
        weights=weights,
        kv_cache=kv_cache,
        kv_bytes_per_token=per_token,
        activations=activation_bytes(shape, size, context * batch, params),
        workspace=WORKSPACE[device_kind],
        runtime_overhead=RUNTIME_OVERHEAD[device_kind],
    )


def mlp_width(shape: ModelShape) -> int:
    """Activations per token of the widest MLP (a model may mix dense and MoE layers: Qwen3-MoE), in
    elements of the compute dtype. Dense: gate, up, act. MoE, as the engine runs it (engine/moe.py,
    grouped by expert): the token's row copied once per expert it goes to, each copy's expert output,
    the weighted outputs in fp32 (two elements) and cast back: 5 x hidden per routed copy; one expert's
    gate, up, act at a time, over at most every token; the router's logits and fp32 probabilities."""
    dense = 3 * shape.intermediate_size
    if not shape.moe:
        return dense
    routed = shape.num_experts_per_tok * 5 * shape.hidden_size  # type: ignore[operator]
    expert = 3 * (shape.expert_intermediate_size or shape.intermediate_size)
    return max(dense, routed + expert + 3 * shape.num_experts)  # type: ignore[operator]


def activation_bytes(shape: ModelShape, size: int, tokens: int, params: FitParams = FitParams()) -> int:
    """Peak of one step: a prefill chunk through a layer, then the logits (and softmax) of its rows."""
    step = min(tokens, params.max_batched_tokens)
    attention = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim  # q, k, v
    per_token = 3 * shape.hidden_size + attention + mlp_width(shape)  # residual, norm, attn out; the MLP's
    rows = min(params.max_num_seqs, step)
    logits = 2 * rows * shape.vocab_size * max(size, 4)  # logits and softmax, at least float32 precision
    return step * per_token * size + logits
