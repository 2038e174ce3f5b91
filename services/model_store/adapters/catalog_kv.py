"""The catalog's truth: a JetStream KV bucket that every model-store replica shares.

Keys (a name's '.' is written '=' so that a key's tokens stay unambiguous):

- ``head.<name>``            {"latest": N}   the last version handed out; bumped with compare-and-set
- ``model.<name>.<N>``       StoredModel     manifest + signature of one version (created once)
- ``alias.<name>.<alias>``   {"version": N}  moved with compare-and-set
- ``dataset.<hex>``          StoredDataset
- ``blobinfo.<hex>``         BlobInfo        what was learnt when the blob was checked at upload
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import BaseModel

from shared.catalog import CATALOG_BUCKET, ResolvedDataset, ResolvedModel
from shared.errors import Conflict

from services.model_store.domain.checks import SafetensorsSummary
from services.model_store.domain.gguf import GgufSummary

CAS_ATTEMPTS = 50


class StoredModel(ResolvedModel):
    """What ``model.<name>.<N>`` holds (aliases are kept under their own keys)."""


class BlobInfo(BaseModel):
    size: int
    head: str = ""  # hex of the first bytes, for the pickle sniff of a blob pushed under another name
    safetensors: SafetensorsSummary | None = None
    gguf: GgufSummary | None = None  # a .gguf file's header (added with GGUF support)


def enc(name: str) -> str:
    return name.replace(".", "=")


def dec(token: str) -> str:
    return token.replace("=", ".")


def catalog_bucket_config(replicas: int = 1, bucket: str = CATALOG_BUCKET) -> KeyValueConfig:
    return KeyValueConfig(bucket=bucket, history=8, replicas=replicas, description="Strata model catalog")


class CatalogKV:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, bucket: str = CATALOG_BUCKET, replicas: int = 1) -> CatalogKV:
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(catalog_bucket_config(replicas, bucket))
        return cls(kv)

    # -- raw ----------------------------------------------------------------------------------
    async def _get(self, key: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # also KeyDeletedError
            return None
        if entry.value is None:
            return None
        return json.loads(entry.value), entry.revision or 0

    async def _put(self, key: str, value: BaseModel | dict[str, Any]) -> int:
        raw = value.model_dump_json() if isinstance(value, BaseModel) else json.dumps(value)
        return await self.kv.put(key, raw.encode())

    # -- versions -----------------------------------------------------------------------------
    async def allocate_version(self, name: str) -> int:
        """The next version of ``name``; two replicas racing never get the same number."""
        key = f"head.{enc(name)}"
        for _ in range(CAS_ATTEMPTS):
            current = await self._get(key)
            try:
                if current is None:
                    await self.kv.create(key, json.dumps({"latest": 1}).encode())
                    return 1
                latest = int(current[0]["latest"]) + 1
                await self.kv.update(key, json.dumps({"latest": latest}).encode(), last=current[1])
                return latest
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.005)
        raise Conflict(f"could not allocate a version of {name!r}: too many concurrent pushes")

    async def create_model(self, stored: StoredModel) -> None:
        key = f"model.{enc(stored.model.name)}.{stored.model.version}"
        try:
            await self.kv.create(key, stored.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            raise Conflict(f"{stored.model.name}:{stored.model.version} already exists") from None

    async def get_model(self, name: str, version: int) -> StoredModel | None:
        found = await self._get(f"model.{enc(name)}.{version}")
        return StoredModel.model_validate(found[0]) if found else None

    async def delete_model(self, name: str, version: int) -> None:
        await self.kv.delete(f"model.{enc(name)}.{version}")

    # -- aliases ------------------------------------------------------------------------------
    async def get_alias(self, name: str, alias: str) -> int | None:
        found = await self._get(f"alias.{enc(name)}.{alias}")
        return int(found[0]["version"]) if found else None

    async def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point the alias at ``version``; return the version it pointed at before (CAS, no lost move)."""
        key = f"alias.{enc(name)}.{alias}"
        for _ in range(CAS_ATTEMPTS):
            current = await self._get(key)
            try:
                if current is None:
                    await self.kv.create(key, json.dumps({"version": version}).encode())
                    return None
                await self.kv.update(key, json.dumps({"version": version}).encode(), last=current[1])
                return int(current[0]["version"])
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.005)
        raise Conflict(f"could not move alias {name}@{alias}: too many concurrent moves")

    async def delete_alias(self, name: str, alias: str) -> None:
        await self.kv.delete(f"alias.{enc(name)}.{alias}")

    # -- datasets and blobs -------------------------------------------------------------------
    async def put_dataset(self, stored: ResolvedDataset) -> None:
        await self._put(f"dataset.{stored.digest.removeprefix('sha256:')}", stored)

    async def get_dataset(self, digest: str) -> ResolvedDataset | None:
        found = await self._get(f"dataset.{digest.removeprefix('sha256:')}")
        return ResolvedDataset.model_validate(found[0]) if found else None

    async def put_blob_info(self, sha256: str, info: BlobInfo) -> None:
        await self._put(f"blobinfo.{sha256}", info)

    async def get_blob_info(self, sha256: str) -> BlobInfo | None:
        found = await self._get(f"blobinfo.{sha256}")
        return BlobInfo.model_validate(found[0]) if found else None

    async def delete_blob_info(self, sha256: str) -> None:
        await self.kv.delete(f"blobinfo.{sha256}")

    async def keys(self) -> list[str]:
        try:
            return await self.kv.keys()
        except NoKeysError:
            return []

    async def watch(self) -> AsyncIterator[tuple[str, dict[str, Any] | None] | None]:
        """Every key's current value, then ``None`` (caught up), then each change as it happens."""
        watcher = await self.kv.watchall()
        try:
            # plain iteration, not updates(timeout): asyncio.wait_for on Python 3.11 can swallow the
            # cancellation that stops this watch when an entry arrives at the same moment
            async for entry in watcher:
                if entry is None:
                    yield None
                    continue
                value = json.loads(entry.value) if entry.value and entry.operation is None else None
                yield entry.key, value
        finally:
            await watcher.stop()

