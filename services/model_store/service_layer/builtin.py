"""At first start on an empty catalog: register the bundled corpus as a dataset and the shipped
built-in checkpoint as a model trained on it, aliased ``prod``.

A KV key taken with create() makes one replica do it even when several start together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from builtin_model import CORPUS_DIR, MODEL_DIR, MODEL_NAME
from shared.catalog import FileEntry, PushDatasetRequest, PushedModel, PushModelRequest

from services.model_store.service_layer.handlers import ModelStore

log = logging.getLogger("model-store")
CORPUS_FILES = ("kjv.txt", "README.md", "LICENSE")
CLAIM_KEY = "builtin.registered"


async def register_builtin(
    store: ModelStore, corpus_dir: Path | None = None, model_dir: Path | None = None
) -> PushedModel | None:
    """Register the built-in dataset and model once per catalog; None when there is nothing to do."""
    corpus_dir = corpus_dir or CORPUS_DIR
    model_dir = model_dir or MODEL_DIR
    try:
        if not (model_dir / "config.json").exists():
            log.info("no built-in checkpoint at %s (run `strata train`); nothing registered", model_dir)
            return None
        if any(k.startswith(("model.", "head.")) for k in await store.kv.keys()):
            return None  # not a first start: the user's catalog is left as it is
        try:
            await store.kv.kv.create(CLAIM_KEY, b"{}")
        except Exception:  # another replica claimed it, or it was done before
            return None
        try:
            return await _register(store, corpus_dir, model_dir)
        except Exception:
            await store.kv.kv.delete(CLAIM_KEY)  # let the next start try again
            raise
    except Exception:
        log.exception("could not register the built-in model")
        return None


CORPUS_SOURCE = "King James Version (1611), Debian package bible-kjv-text 4.38"


async def _register(store: ModelStore, corpus_dir: Path, model_dir: Path) -> PushedModel:
    datasets = []
    files = [f for f in CORPUS_FILES if (corpus_dir / f).is_file()]
    if files:
        entries = [await _add(store, corpus_dir / f, f) for f in files]
        dataset = await store.register_dataset(
            PushDatasetRequest(
                name="kjv-corpus",
                files=entries,
                license="public domain",
                source=CORPUS_SOURCE,
                description="The built-in model's training corpus (selected books of the KJV Bible)",
            )
        )
        datasets.append(dataset.digest)
    record_path = model_dir / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    name = (record or {}).get("model_name") or MODEL_NAME
    paths = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    entries = [await _add(store, p, p.relative_to(model_dir).as_posix()) for p in paths]
    pushed = await store.register_model(
        PushModelRequest(
            name=name,
            files=entries,
            license="see training record (trained by Strata on a public-domain corpus)",
            datasets=datasets,
            training_record=record,
        )
    )
    await store.set_alias(f"{name}:{pushed.model.version}", "prod")
    log.info("registered built-in model %s:%s (%s)", name, pushed.model.version, pushed.model.digest)
    return pushed


async def _add(store: ModelStore, file: Path, path: str) -> FileEntry:
    sha256, size = await store.ingest.add_local_file(file, path)
    return FileEntry(path=path, sha256=sha256, size=size)
