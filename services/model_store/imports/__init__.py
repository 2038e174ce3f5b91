"""Imports from the local caches of other tools (Ollama, the Hugging Face hub): each reads the tool's
documented on-disk layout, checks every file against the digest the tool named it by, and returns an
``ImportPlan`` that the one push path (services/model_store/client.py push_model) uploads with its
``source``. Nothing is uploaded until the whole plan has been checked."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import Invalid
from shared.model_source import ModelSource

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ImportPlan:
    """What to push: ``files`` under ``directory``, as ``name`` (the default store name), with ``source``."""

    directory: Path
    files: list[Path]
    name: str
    source: ModelSource
    license: str | None = None
    notes: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(
        default_factory=dict
    )  # path -> sha256 hex taken while checking a file by another digest

    @property
    def checked_sha256(self) -> dict[str, str]:
        """Path -> sha256 hex of every file as the import checked it: the push declares these, so model-store
        refuses a file whose content changed after the check (it hashes what it receives)."""
        named = {path: d.removeprefix("sha256:") for path, d in self.source.digests.items() if d.startswith("sha256:")}
        return {path: hex_ for path, hex_ in {**self.sha256, **named}.items() if (self.directory / path) in self.files}


def hash_file(path: Path, algorithm: str = "sha256", prefix: bytes = b"") -> str:
    return hash_file_and_sha256(path, algorithm, prefix)[0]


def hash_file_and_sha256(path: Path, algorithm: str = "sha256", prefix: bytes = b"") -> tuple[str, str]:
    """(the ``algorithm`` digest of ``prefix`` + the content, the content's sha256), in one read."""
    digest, sha = hashlib.new(algorithm), hashlib.sha256()
    digest.update(prefix)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            sha.update(block)
    return digest.hexdigest(), sha.hexdigest()


def check_sha256(path: Path, expected_hex: str, label: str) -> None:
    actual = hash_file(path)
    if actual != expected_hex:
        raise Invalid(
            f"{label}: {path} hashes to sha256:{actual}, but it is named sha256:{expected_hex} "
            "(corrupt or half-written; pull it again with its tool)"
        )


def store_name(text: str) -> str:
    """A source's name as a model-store name (shared/catalog.py NAME_PATTERN): other characters become '-'."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in text).lstrip("._-")
    return cleaned[:128] or "imported"
