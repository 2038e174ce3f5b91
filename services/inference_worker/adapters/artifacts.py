"""Where checkpoints come from: a small interface, so that the lifecycle does not care whether the
files were fetched (and verified) from model-store or sit in a local directory (tests, dev)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nats.aio.client import Client

from shared.bus import retry_transient
from shared.errors import NotFound
from shared.events import ModelId


@dataclass(frozen=True)
class Artifact:
    path: Path  # a checkpoint directory (config.json, *.safetensors, tokenizer.json)
    model: ModelId
    aliases: tuple[str, ...] = field(default=())


class ArtifactSource(Protocol):
    async def fetch(self, model: ModelId, ref: str) -> Artifact:
        """The verified checkpoint of exactly ``model`` (its digest); raise on any failure, with a
        message that names what is wrong (the file, the digest)."""
        ...


class ModelStoreSource:
    """Fetches through model-store's fetch helper, which checks the manifest's signature and every
    file's sha256 before it returns; the blobs are cached under ``cache_dir``."""

    def __init__(self, nc: Client, cache_dir: Path) -> None:
        self.nc, self.cache_dir = nc, cache_dir

    async def fetch(self, model: ModelId, ref: str) -> Artifact:
        from shared.model_fetch import VerificationError, fetch_model

        # A clustered model-store stream electing a leader answers 503 for a moment: a deploy waits it
        # out rather than failing (a failed replica stays failed). Fetching again reuses what is cached.
        local = await retry_transient(f"fetch {model.name}:{model.version}",
                                      lambda: fetch_model(self.nc, f"{model.name}:{model.version}", self.cache_dir))
        if local.resolved.model.digest != model.digest:
            # the scheduled version must be the one that is loaded: a re-pushed version is refused
            raise VerificationError(f"{model.name}:{model.version}: model-store serves digest "
                                    f"{local.resolved.model.digest}, the deployment names {model.digest}")
        return Artifact(local.path, local.resolved.model, tuple(local.resolved.aliases))


class LocalSource:
    """Checkpoint directories by model name (tests, development): no signature to check."""

    def __init__(self, paths: dict[str, Path] | None = None) -> None:
        self.paths = dict(paths or {})

    async def fetch(self, model: ModelId, ref: str) -> Artifact:
        path = self.paths.get(model.name)
        if path is None:
            raise NotFound(f"no local checkpoint for {model.name}")
        return Artifact(Path(path), model)
