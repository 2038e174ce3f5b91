"""A model's metadata, read from its config.json and the headers of its safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.architectures import runtime_for, runtime_for_gguf, supported
from shared.catalog import ModelMetadata
from shared.errors import Invalid

from services.model_store.domain.checks import SafetensorsSummary
from services.model_store.domain.gguf import GgufSummary, check_gguf_set, first_part

MAX_CONFIG_BYTES = 4 * 1024 * 1024


def parse_config(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        raise Invalid(f"config.json: {len(raw)} bytes is larger than the {MAX_CONFIG_BYTES} byte limit")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid(f"config.json: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise Invalid(f"config.json: must be a JSON object, got {type(config).__name__}")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)
    ):
        raise Invalid("config.json: 'architectures' must be a non-empty list of class names")
    if not architectures and not isinstance(config.get("model_type"), str):
        raise Invalid("config.json: names neither 'architectures' nor 'model_type', so the model cannot be identified")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise Invalid(f"config.json: {key} must be a positive integer, got {value!r}")
    return config


def model_metadata(config: dict[str, Any], summaries: Iterable[SafetensorsSummary]) -> ModelMetadata:
    summaries = list(summaries)
    by_dtype: dict[str, int] = {}
    for summary in summaries:
        for dtype, size in summary.bytes_by_dtype.items():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    dominant = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else "unknown"
    architectures = config.get("architectures") or [config["model_type"]]
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return ModelMetadata(
        architecture=architectures[0],
        model_type=config.get("model_type"),
        parameters=sum(s.parameters for s in summaries),
        dtype=dominant,
        num_layers=config.get("num_hidden_layers") or text.get("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size"),
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=config.get("vocab_size"),
        context_length=config.get("max_position_embeddings"),
        weight_bytes=sum(s.data_bytes for s in summaries),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        runtime=runtime_for(architectures),
        num_experts=config.get("num_local_experts") or config.get("num_experts"),
        num_experts_per_tok=config.get("num_experts_per_tok"),
        moe_intermediate_size=config.get("moe_intermediate_size"),
    )


def warnings(metadata: ModelMetadata) -> list[str]:
    """What a push stores but should say: an architecture no runtime serves (fit and deploy refuse it)."""
    if metadata.runtime is None and metadata.format == "gguf":
        return [
            f"llama.cpp is not known to load GGUF architecture {metadata.architecture!r}; fit and deploy will refuse it"
        ]
    if metadata.runtime is None:
        return [f"no runtime serves {metadata.architecture}; supported: {supported()}"]
    return []


def gguf_metadata(summaries: dict[str, GgufSummary]) -> ModelMetadata:
    """A GGUF model's metadata: the figures from its (first part's) header, the tensors over every part."""
    check_gguf_set(summaries)
    path, head = first_part(summaries)
    if head.architecture is None:
        raise Invalid(f"{path}: has no general.architecture: not a model GGUF")
    by_type: dict[str, int] = {}
    for s in summaries.values():
        for t, n in s.bytes_by_type.items():
            by_type[t] = by_type.get(t, 0) + n
    dominant = max(by_type, key=lambda t: by_type[t]) if by_type else "unknown"
    heads = head.num_heads
    return ModelMetadata(
        architecture=head.architecture,
        model_type=head.architecture,
        parameters=sum(s.parameters for s in summaries.values()),
        dtype=dominant,
        num_layers=head.num_layers,
        hidden_size=head.hidden_size,
        intermediate_size=head.intermediate_size,
        num_heads=heads,
        num_kv_heads=head.num_kv_heads or heads,
        head_dim=head.key_length or (head.hidden_size // heads if head.hidden_size and heads else None),
        vocab_size=head.vocab_size,
        context_length=head.context_length,
        weight_bytes=sum(s.data_bytes for s in summaries.values()),
        runtime=runtime_for_gguf(head.architecture),
        num_experts=head.num_experts,
        num_experts_per_tok=head.num_experts_per_tok,
        format="gguf",
        quantization=head.file_type or dominant,
        bytes_by_type=by_type,
        chat_template=head.chat_template,
    )
