"""Reading a GGUF file's header from disk; what it says is checked by the domain (domain/gguf.py)."""

from __future__ import annotations

from pathlib import Path

from services.model_store.domain import gguf
from services.model_store.domain.gguf import GGUF_MAGIC, GgufSummary
from shared.errors import Invalid


def inspect_gguf(path: str, file: Path) -> GgufSummary:
    """Read and check a GGUF header; Invalid (starting with ``path``) when it cannot be read."""
    with file.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise Invalid(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a model-store dependency
        raise Invalid(f"{path}: GGUF files need the 'gguf' package on model-store") from None
    try:
        reader = GGUFReader(str(file), "r")
        return gguf.summary(path, reader, file.stat().st_size)
    except Invalid:
        raise
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors on a broken header
        raise Invalid(f"{path}: not a readable GGUF file: {type(exc).__name__}: {exc}") from None
