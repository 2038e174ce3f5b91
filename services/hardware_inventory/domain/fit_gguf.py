"""The memory fit of a GGUF model under llama.cpp (the worker's llama.cpp runtime).

    need = weights + KV cache + compute buffer + workspace

* weights: the file's tensor bytes as stored, type by type (F16, Q8_0, Q4_K ...): llama.cpp computes
  on the quantized blocks, so nothing is rescaled (the manifest's ``bytes_by_type`` sums to this);
* KV cache: 2 (K and V) x n_layer x n_head_kv x head_dim x KV-type bytes per cell (llama.cpp's default
  cells are f16), for ``context x batch`` cells, rounded up to the 256 cells llama.cpp pads a context to;
* compute buffer: the graph of one ``llama_decode`` of up to ``n_ubatch`` tokens, which llama.cpp
  reserves at context creation: the logits (n_vocab floats per token), one layer's activations
  (hidden and FFN widths), and the attention scores of every head over the whole cache (the
  non-flash-attention path, the larger one) in f32;
* workspace: the same per-device allowance as the engine's fit.
"""

from __future__ import annotations

import math

from services.hardware_inventory.domain.fit import RUNTIME_OVERHEAD, WORKSPACE
from shared.errors import Invalid
from shared.inventory import DeviceKind, FitEstimate, ModelShape

KV_TYPE_BYTES = 2  # f16 cells: llama.cpp's default type_k/type_v, which the worker does not change
CELL_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of this
N_UBATCH = 512  # the worker's n_batch = n_ubatch (llamacpp/engine.py)


def kv_bytes_per_token(shape: ModelShape) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * KV_TYPE_BYTES


def compute_buffer(shape: ModelShape, cells: int, tokens: int) -> int:
    ubatch = min(N_UBATCH, tokens)
    per_token = shape.vocab_size + 4 * shape.hidden_size + 3 * shape.intermediate_size + shape.num_heads * cells
    return 4 * ubatch * per_token


def predict_gguf(shape: ModelShape, device_kind: DeviceKind, *, context_length: int | None = None,
                 batch: int = 1, dtype: str | None = None) -> FitEstimate:
    if dtype:
        raise Invalid(f"a GGUF model runs in the types its file stores ({shape.dtype} and others); "
                      f"dtype {dtype!r} does not apply to it")
    if batch < 1:
        raise Invalid(f"batch must be >= 1, got {batch}")
    context = context_length or shape.context_length
    if not 1 <= context <= shape.context_length:
        raise Invalid(f"context length {context} is outside 1..{shape.context_length}, the model's maximum")
    cells = math.ceil(context * batch / CELL_PAD) * CELL_PAD
    per_token = kv_bytes_per_token(shape)
    return FitEstimate(
        device_kind=device_kind, dtype=shape.dtype, context_length=context, batch=batch,
        weights=shape.weight_bytes, kv_cache=per_token * cells, kv_bytes_per_token=per_token,
        activations=compute_buffer(shape, cells, context * batch),
        workspace=WORKSPACE[device_kind], runtime_overhead=RUNTIME_OVERHEAD[device_kind],
    )
