"""Worker side: fetch a model into a local content-addressed cache, verified before it is used.

    local = await fetch_model(nc, "strata-builtin-kjv@prod", Path(".strata/inference-worker/cache"))
    load(local.path)   # a checkpoint directory with the manifest's file names

Layout of ``cache_dir``: ``blobs/<sha256>`` (one file per distinct content, shared by models),
``models/<name>/<version>-<digest12>/`` (the checkpoint: hard links to the blobs, copies where
links are impossible) and ``manifests/<digest12>.json`` (the resolved manifest and its signature).

Every check happens before the function returns: the manifest's digest is the model's identity,
the DSSE signature is by model-store's key and covers exactly this manifest, and every file's
sha256 (cached ones are hashed again: a cache is only a cache). Any failure raises
``VerificationError`` naming the file. Importable without torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from nats.aio.client import Client
from pydantic import BaseModel

from shared import rpc
from shared.catalog import PublicKey, PublicKeyRequest, ResolvedModel, ResolveRequest
from shared.contracts import model_store
from shared.dsse import VerificationError, load_public_key, verify_resolved
from shared.errors import NotFound

from shared.blob_store import BlobStore

__all__ = ["LocalModel", "VerificationError", "fetch_model", "verify_manifest"]


class LocalModel(BaseModel):
    path: Path
    resolved: ResolvedModel


def verify_manifest(resolved: ResolvedModel, public_key: PublicKey) -> None:
    """The manifest is the one its digest names and the one model-store signed."""
    verify_resolved(resolved, load_public_key(public_key))


async def fetch_model(
    nc: Client, ref_or_resolved: str | ResolvedModel, cache_dir: Path | str, *,
    public_key: PublicKey | None = None, timeout: float = 10.0,
) -> LocalModel:
    cache = Path(cache_dir)
    if isinstance(ref_or_resolved, ResolvedModel):
        resolved = ref_or_resolved
    else:
        resolved = await rpc.call(
            nc, model_store.RESOLVE.subject, ResolveRequest(ref=ref_or_resolved), ResolvedModel, timeout=timeout
        )
    if public_key is None:
        public_key = await rpc.call(nc, model_store.PUBLIC_KEY.subject, PublicKeyRequest(), PublicKey, timeout=timeout)
    verify_manifest(resolved, public_key)

    blob_dir = cache / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    cached = await _verified_cached(blob_dir, {entry.sha256 for entry in resolved.manifest.files})
    store: BlobStore | None = None
    for entry in resolved.manifest.files:
        target = blob_dir / entry.sha256
        if entry.sha256 in cached:
            continue  # reused: hashed again just now
        target.unlink(missing_ok=True)
        store = store or await BlobStore.open(nc.jetstream())
        partial = blob_dir / f".{entry.sha256}.{uuid.uuid4().hex[:8]}.part"
        try:
            with partial.open("wb") as f:
                try:
                    actual, size = await store.download(entry.sha256, f)
                except NotFound:
                    raise VerificationError(
                        f"{entry.path}: blob sha256:{entry.sha256} is missing from the store"
                    ) from None
            if actual != entry.sha256 or size != entry.size:
                raise VerificationError(
                    f"{entry.path}: content from the store hashes to sha256:{actual} ({size} bytes), "
                    f"but the signed manifest says sha256:{entry.sha256} ({entry.size} bytes)"
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    model = resolved.model
    final = cache / "models" / model.name / f"{model.version}-{model.digest.removeprefix('sha256:')[:12]}"
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    for entry in resolved.manifest.files:
        dest = staging / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob_dir / entry.sha256, dest)
        except OSError:
            shutil.copyfile(blob_dir / entry.sha256, dest)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    manifests = cache / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    (manifests / f"{model.digest.removeprefix('sha256:')[:12]}.json").write_text(resolved.model_dump_json(indent=2))
    return LocalModel(path=final, resolved=resolved)


async def _verified_cached(blob_dir: Path, digests: set[str]) -> set[str]:
    """The digests whose cached blob hashes to its name. The hashing runs in worker threads, so
    a gigabyte of re-hashing does not stall the event loop (a worker serves other models on it),
    and several blobs (a sharded checkpoint) are hashed at once: hashlib releases the GIL."""
    present = sorted(d for d in digests if (blob_dir / d).exists())
    limit = asyncio.Semaphore(max(1, min(len(present), os.cpu_count() or 1)))

    async def check(digest: str) -> bool:
        async with limit:
            return await asyncio.to_thread(_sha256_file, blob_dir / digest) == digest

    results = await asyncio.gather(*(check(d) for d in present))
    return {d for d, ok in zip(present, results) if ok}


def _sha256_file(path: Path) -> str:
    with path.open("rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
