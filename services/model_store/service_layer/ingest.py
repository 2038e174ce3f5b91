"""Blobs in: spool a stream to a temp file while hashing it, check it, store it once by digest."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from shared.errors import InsufficientStorage, Invalid, NotFound

from shared.blob_store import BlobStore
from services.model_store.adapters.catalog_kv import BlobInfo, CatalogKV
from services.model_store.domain.checks import check_path, inspect_safetensors, refuse_pickle, sniff_pickle
from services.model_store.adapters.gguf_file import inspect_gguf
from services.model_store.domain.gguf import is_gguf
from services.model_store.service_layer.space import SpaceGuard

HEAD_BYTES = 16
SPOOL_CHUNK = 1024 * 1024


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


def check_content(path: str, file: Path, size: int) -> BlobInfo:
    """Validate one file's bytes as what its path says it is; return what the catalog keeps of it."""
    with file.open("rb") as f:
        head = f.read(HEAD_BYTES)
        f.seek(0)
        summary = inspect_safetensors(path, f, size) if is_safetensors(path) else None
    gguf = inspect_gguf(path, file) if is_gguf(path) else None
    if summary is None and gguf is None:
        sniff_pickle(path, head)
    return BlobInfo(size=size, head=head.hex(), safetensors=summary, gguf=gguf)


class Ingest:
    def __init__(self, kv: CatalogKV, blobs: BlobStore, tmp_dir: Path, space: SpaceGuard) -> None:
        self.kv = kv
        self.blobs = blobs
        self.tmp_dir = tmp_dir
        self.space = space
        tmp_dir.mkdir(parents=True, exist_ok=True)

    async def has_blob(self, sha256: str) -> int | None:
        return await self.blobs.size(sha256)

    async def upload(self, sha256: str, chunks: AsyncIterator[bytes], path: str | None = None,
                     declared_size: int | None = None) -> BlobInfo:
        """Receive a blob whose client says it has digest ``sha256`` (and is the file ``path``) and
        ``declared_size`` bytes (its content-length): room for it is claimed before a byte is read.
        Without a declared size the room is claimed once the spool holds it."""
        check_digest(sha256)
        label = path or f"sha256:{sha256}"
        if path is not None:
            check_path(path)
            refuse_pickle(path)
        if declared_size is not None:
            async with (self.space.claim(store=declared_size, spool=declared_size),
                        self._spooled(sha256, chunks, label, declared_size) as (spool, size)):
                return await self._store(sha256, spool, size, path)
        async with (self._spooled(sha256, chunks, label, self.space.spool_room()) as (spool, size),
                    self.space.claim(store=size)):
            return await self._store(sha256, spool, size, path)

    @asynccontextmanager
    async def _spooled(self, sha256: str, chunks: AsyncIterator[bytes], label: str,
                       limit: int) -> AsyncIterator[tuple[Path, int]]:
        """The stream in a temp file (removed afterwards) and its size, once its digest is the declared
        one; InsufficientStorage as soon as it outgrows ``limit``, the room it was given."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
        spool = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    if size + len(chunk) > limit:
                        raise InsufficientStorage(
                            f"{label}: not enough space: after {size + len(chunk)} bytes it outgrew "
                            f"the {max(limit, 0)} bytes free for it on the disk of model-store's spool "
                            "(with a content-length it is refused before it is sent)"
                        )
                    digest.update(chunk)
                    _spool_write(f, chunk, label, size)
                    size += len(chunk)
            if digest.hexdigest() != sha256:
                raise Invalid(
                    f"{label}: the content's sha256 is {digest.hexdigest()}, "
                    f"not the declared {sha256} (corrupted in transit?)"
                )
            yield spool, size
        finally:
            spool.unlink(missing_ok=True)

    async def add_local_file(self, file: Path, path: str) -> tuple[str, int]:
        """A file on this machine (the built-in model): hash it, check it, store it. Returns (sha256, size)."""
        check_path(path)
        refuse_pickle(path)
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while block := f.read(SPOOL_CHUNK):
                digest.update(block)
        sha256, size = digest.hexdigest(), file.stat().st_size
        if await self.blobs.size(sha256) != size or await self.kv.get_blob_info(sha256) is None:
            async with self.space.claim(store=size):
                await self._store(sha256, file, size, path)
        return sha256, size

    async def _store(self, sha256: str, file: Path, size: int, path: str | None) -> BlobInfo:
        info = check_content(path or f"sha256:{sha256}", file, size) if path else BlobInfo(size=size, head=_head(file))
        known = await self.kv.get_blob_info(sha256)
        if known is not None and (
            known.safetensors is not None and info.safetensors is None or known.gguf is not None and info.gguf is None
        ):
            info = known  # keep what an earlier upload as .safetensors or .gguf learnt
        if await self.blobs.size(sha256) != size:
            await self.blobs.put_path(sha256, file)
        await self.kv.put_blob_info(sha256, info)
        return info

    async def info_for(self, sha256: str, path: str, size: int) -> BlobInfo:
        """What the catalog knows of a listed file, checking it now if it was uploaded without a path."""
        stored = await self.blobs.size(sha256)
        if stored is None:
            raise Invalid(f"{path}: blob sha256:{sha256} has not been uploaded (PUT /v1/blobs/{sha256} first)")
        if stored != size:
            raise Invalid(f"{path}: listed as {size} bytes but the stored blob sha256:{sha256} has {stored}")
        info = await self.kv.get_blob_info(sha256)
        if info is None or (is_safetensors(path) and info.safetensors is None) or (is_gguf(path) and info.gguf is None):
            info = await self._recheck(sha256, path, size)
        elif not is_safetensors(path) and not is_gguf(path):
            sniff_pickle(path, bytes.fromhex(info.head))
        return info

    async def _recheck(self, sha256: str, path: str, size: int) -> BlobInfo:
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="check-")
        spool = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                actual, got = await self.blobs.download(sha256, f)
            if actual != sha256 or got != size:
                raise Invalid(f"{path}: the stored blob sha256:{sha256} is corrupt (its content hashes to {actual})")
            info = check_content(path, spool, size)
        finally:
            spool.unlink(missing_ok=True)
        await self.kv.put_blob_info(sha256, info)
        return info

    async def read_small(self, sha256: str, path: str, limit: int) -> bytes:
        """A small listed file's bytes (config.json, training_record.json), checked against its digest."""
        size = await self.blobs.size(sha256)
        if size is None:
            raise NotFound(f"{path}: blob sha256:{sha256} is not in the store")
        if size > limit:
            raise Invalid(f"{path}: {size} bytes is larger than the {limit} byte limit for this file")
        chunks = [chunk async for chunk in self.blobs.chunks(sha256)]
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise Invalid(f"{path}: the stored blob sha256:{sha256} is corrupt")
        return data


def _spool_write(f: BinaryIO, chunk: bytes, label: str, written: int) -> None:
    """A spool that meets a full disk (an upload of undeclared size, or a disk others filled) is
    InsufficientStorage, not an unexplained failure."""
    try:
        f.write(chunk)
        f.flush()
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise InsufficientStorage(
            f"{label}: the disk of model-store's spool filled up after {written} bytes ({exc.strerror})"
        ) from None


def check_digest(sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise Invalid(f"{sha256!r} is not a sha256 hex digest (64 lowercase hex characters)")


def _head(file: Path) -> str:
    with file.open("rb") as f:
        return f.read(HEAD_BYTES).hex()
