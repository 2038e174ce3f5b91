"""GGUF files (llama.cpp's format): what one holds, read from its header with the ``gguf`` package.

No llama.cpp is needed at push: the key/value metadata and the tensor infos say the architecture,
the quantization (general.file_type), the shape figures fit needs, the context length and the chat
template. The reader memory-maps the file and touches only the header; tensor data is never read.
A file the reader cannot parse, or whose tensors do not lie inside it, is ``Invalid`` naming the path,
so an unreadable GGUF is refused at upload and nothing is stored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from shared.errors import Invalid

GGUF_MAGIC = b"GGUF"
# llama.cpp's split naming (gguf-split): NAME-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GgufSummary(BaseModel):
    """One GGUF file's header, as far as the catalog and fit need it. A split's first file carries
    the model's metadata; every file carries its own tensors and split.no/split.count."""

    architecture: str | None = None
    name: str | None = None
    file_type: str | None = None  # e.g. "Q8_0", from general.file_type (LlamaFileType)
    split_no: int = 0
    split_count: int = 1
    tensors: int
    parameters: int
    data_bytes: int
    bytes_by_type: dict[str, int]  # ggml tensor type ("F16", "Q8_0", "Q4_K") -> bytes
    context_length: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    vocab_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    chat_template: str | None = None


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def summary(path: str, reader: Any, size: int) -> GgufSummary:
    """What a GGUF header (a ``gguf.GGUFReader`` over it) says, checked; ``path`` names the file in errors."""
    from gguf import GGMLQuantizationType, LlamaFileType

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            return None
        if len(field.types) > 1:  # an array (the vocabulary, merges): not a figure the catalog keeps
            return None
        return field.contents()

    arch = value("general.architecture")
    arch_key = (lambda k: f"{arch}.{k}") if isinstance(arch, str) else (lambda k: f"?.{k}")

    def positive(key: str) -> int | None:
        v = value(arch_key(key))
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise Invalid(f"{path}: {arch_key(key)} must be a positive integer, got {v!r}")
        return int(v)

    by_type: dict[str, int] = {}
    parameters = data_bytes = 0
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise Invalid(f"{path}: tensor {t.name!r} runs past the end of the file ({end} > {size} bytes)")
        type_name = GGMLQuantizationType(t.tensor_type).name
        by_type[type_name] = by_type.get(type_name, 0) + int(t.n_bytes)
        parameters += int(t.n_elements)
        data_bytes += int(t.n_bytes)
    file_type = value("general.file_type")
    try:
        ftype = (
            LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            if file_type is not None
            else None
        )
    except ValueError:
        ftype = f"file_type {file_type}"
    split_no, split_count = value("split.no"), value("split.count")
    if split_count is None and SPLIT_NAME.match(path.rsplit("/", 1)[-1]):
        raise Invalid(f"{path}: named as a split GGUF but has no split.count in its metadata")
    template = value("tokenizer.chat_template")
    vocab = positive("vocab_size")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    if split_no in (None, 0) and not isinstance(arch, str):
        raise Invalid(f"{path}: has no general.architecture: not a model GGUF llama.cpp can load")
    return GgufSummary(
        architecture=arch if isinstance(arch, str) else None,
        name=_str(value("general.name")),
        file_type=ftype,
        split_no=int(split_no or 0),
        split_count=int(split_count or 1),
        tensors=len(reader.tensors),
        parameters=parameters,
        data_bytes=data_bytes,
        bytes_by_type=by_type,
        context_length=positive("context_length"),
        num_layers=positive("block_count"),
        hidden_size=positive("embedding_length"),
        intermediate_size=positive("feed_forward_length"),
        num_heads=positive("attention.head_count"),
        num_kv_heads=positive("attention.head_count_kv"),
        key_length=positive("attention.key_length"),
        value_length=positive("attention.value_length"),
        vocab_size=vocab,
        num_experts=positive("expert_count"),
        num_experts_per_tok=positive("expert_used_count"),
        chat_template=_str(template),
    )


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def check_gguf_set(summaries: dict[str, GgufSummary]) -> None:
    """The .gguf files of one model: a single file, or every part of one split, each once."""
    if len(summaries) == 1:
        ((path, s),) = summaries.items()
        if s.split_count > 1:
            raise Invalid(
                f"{path}: part {s.split_no + 1} of a {s.split_count}-file split GGUF; push every part together"
            )
        return
    counts = {s.split_count for s in summaries.values()}
    if len(counts) != 1 or counts.pop() != len(summaries):
        raise Invalid(
            f"{len(summaries)} .gguf files that are not the parts of one split GGUF "
            "(a model holds one GGUF, or every file of one gguf-split)"
        )
    numbers = sorted(s.split_no for s in summaries.values())
    if numbers != list(range(len(summaries))):
        raise Invalid(f"the split GGUF's parts are numbered {numbers}, not 0..{len(summaries) - 1}")


def first_part(summaries: dict[str, GgufSummary]) -> tuple[str, GgufSummary]:
    """The file whose header holds the model's metadata (split.no 0)."""
    return min(summaries.items(), key=lambda kv: kv[1].split_no)
