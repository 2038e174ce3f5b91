"""What model-store accepts: safetensors checked header by header, never a pickle, sane paths.

Every error is ``shared.errors.Invalid`` and its message starts with the file's path, so that a
user pushing a directory of twenty files learns which one is wrong and why.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from pydantic import BaseModel

from shared.errors import Invalid

# Bytes per element of every dtype the safetensors format defines with a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# Real checkpoints have headers well under a megabyte; a bigger one is a broken or hostile file
# and reading it would break the promise that uploads stream in bounded memory.
MAX_HEADER_BYTES = 32 * 1024 * 1024

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".npy", ".npz"}
PICKLE_REASON = (
    "pickle-based formats are refused because loading a pickle runs arbitrary code; "
    "convert it to safetensors (e.g. safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))"
)


class SafetensorsSummary(BaseModel):
    """What one safetensors file holds, as far as the catalog's metadata needs."""

    tensors: int
    parameters: int
    data_bytes: int
    bytes_by_dtype: dict[str, int]
    names: list[str] = []


def check_path(path: str) -> str:
    """A relative POSIX path inside the checkpoint: no '..', no absolute path, no backslash."""
    pure = PurePosixPath(path)
    if (
        not path or "\\" in path or "\x00" in path or pure.is_absolute()
        or any(part in ("..", ".", "") for part in path.split("/"))
    ):
        raise Invalid(f"{path!r}: not a relative path inside the directory (no '..', no leading '/')")
    return path


def refuse_pickle(path: str) -> None:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise Invalid(f"{path}: {suffix} files are refused: {PICKLE_REASON}")


def sniff_pickle(path: str, head: bytes) -> None:
    """Catch a pickle or a torch.save zip behind an innocent name, from its first bytes."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise Invalid(f"{path}: the content is a Python pickle: {PICKLE_REASON}")
    if head.startswith(b"PK\x03\x04") and not path.endswith((".zip",)):
        raise Invalid(
            f"{path}: the content is a zip archive (torch.save's format, which holds pickles): {PICKLE_REASON}"
        )


def check_files_listing(paths: Iterable[str], *, model: bool) -> None:
    """The set of paths of a model or dataset: unique, safe, no pickles; a model needs weights and config."""
    seen: set[str] = set()
    for path in paths:
        check_path(path)
        refuse_pickle(path)
        if path in seen:
            raise Invalid(f"{path}: listed twice")
        seen.add(path)
    if not seen:
        raise Invalid("no files: a manifest lists at least one file")
    if model and any(p.endswith(".gguf") for p in seen):
        return  # a GGUF model: the file's own header is its config (domain/gguf.py checks the set)
    if model:
        if "config.json" not in seen:
            raise Invalid("config.json: missing; an LLM checkpoint needs its config.json at the top of the directory")
        if not any(p.endswith(".safetensors") for p in seen):
            raise Invalid("no .safetensors file: a model's weights must be in safetensors format (or one GGUF file)")


def inspect_safetensors(path: str, stream: BinaryIO, file_size: int) -> SafetensorsSummary:
    """Parse and check a safetensors header; reads only the header, never the tensor data."""
    if file_size < 8:
        raise Invalid(f"{path}: {file_size} bytes is too short for a safetensors file (8-byte header length missing)")
    (header_len,) = struct.unpack("<Q", stream.read(8))
    if header_len == 0 or 8 + header_len > file_size:
        raise Invalid(f"{path}: header length {header_len} does not fit in a file of {file_size} bytes")
    if header_len > MAX_HEADER_BYTES:
        raise Invalid(f"{path}: header of {header_len} bytes is larger than the {MAX_HEADER_BYTES} byte limit")
    raw = stream.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise Invalid(f"{path}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise Invalid(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return check_header(path, header, file_size - 8 - header_len)


def check_header(path: str, header: dict[str, Any], data_len: int) -> SafetensorsSummary:
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise Invalid(f"{path}: __metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    parameters = 0
    by_dtype: dict[str, int] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
            raise Invalid(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise Invalid(f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_SIZES))})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise Invalid(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise Invalid(f"{where}: data_offsets must be [begin, end] non-negative integers, got {offsets!r}")
        begin, end = offsets
        if begin > end:
            raise Invalid(f"{where}: data_offsets {offsets} end before they begin")
        if end > data_len:
            raise Invalid(f"{where}: data_offsets {offsets} run past the end of the data ({data_len} bytes)")
        elements = math.prod(shape)
        expected = elements * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise Invalid(
                f"{where}: shape {shape} of {dtype} needs {expected} bytes "
                f"but data_offsets {offsets} hold {end - begin}"
            )
        spans.append((begin, end, name))
        parameters += elements
        by_dtype[dtype] = by_dtype.get(dtype, 0) + expected
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise Invalid(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] overlaps the tensor before it")
        if begin > cursor:
            raise Invalid(f"{path}: {begin - cursor} bytes before tensor {name!r} belong to no tensor")
        cursor = end
    if cursor != data_len:
        raise Invalid(f"{path}: {data_len - cursor} bytes after the last tensor belong to no tensor")
    return SafetensorsSummary(
        tensors=len(spans),
        parameters=parameters,
        data_bytes=data_len,
        bytes_by_dtype=by_dtype,
        names=sorted(name for _b, _e, name in spans),
    )


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def json_object(raw: bytes) -> dict:
    """A JSON object from someone else's file; ValueError saying why it is not one (never a
    RecursionError traceback for a deeply nested document)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("not a JSON object (nested too deeply)") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
