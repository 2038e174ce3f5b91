"""Content-addressed blobs in the JetStream Object Store: the object's name is its sha256 (hex).

Uploads read a file object chunk by chunk (nats-py's ``put``), downloads iterate the object's
chunks through a pull consumer a batch at a time, so neither direction holds a whole file in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE, ObjectStore

from shared.catalog import BLOB_BUCKET
from shared.errors import NotFound, Unavailable

FETCH_BATCH = 32  # 128 KiB chunks: 4 MiB in flight per download
FETCH_TIMEOUT_S = 20.0


def blob_store_config(replicas: int = 1, bucket: str = BLOB_BUCKET) -> ObjectStoreConfig:
    return ObjectStoreConfig(bucket=bucket, description="Strata model-store blobs (sha256-named)", replicas=replicas)


class BlobStore:
    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str) -> None:
        self._js = js
        self._store = store
        self.bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, *, create: bool = False, bucket: str = BLOB_BUCKET, replicas: int = 1) -> BlobStore:
        """Open the bucket; ``create`` (model-store only) makes it when missing."""
        try:
            store = await js.object_store(bucket)
        except BucketNotFoundError:
            if not create:
                raise NotFound(f"object store bucket {bucket!r} does not exist (has model-store started?)") from None
            store = await js.create_object_store(bucket, config=blob_store_config(replicas, bucket))
        return cls(js, store, bucket)

    async def size(self, sha256: str) -> int | None:
        """The stored size of a blob, or None when there is none."""
        try:
            info = await self._store.get_info(sha256)
        except (ObjectNotFoundError, NotFoundError):
            return None
        return info.size

    async def put_file(self, sha256: str, stream: BinaryIO) -> int:
        info = await self._store.put(sha256, stream)
        return info.size or 0

    async def put_path(self, sha256: str, path: Path) -> int:
        with path.open("rb") as f:
            return await self.put_file(sha256, f)

    async def chunks(self, sha256: str) -> AsyncIterator[bytes]:
        """The blob's bytes, chunk by chunk, as stored (the caller checks the digest)."""
        try:
            info = await self._store.get_info(sha256)
        except (ObjectNotFoundError, NotFoundError):
            raise NotFound(f"blob sha256:{sha256} is not in the store") from None
        if not info.size:
            return
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        # A pull consumer asks for FETCH_BATCH chunks at a time, so at most that much is ever in
        # flight, however slow the reader. (A push/ordered consumer, as nats-py's get uses, drops
        # messages once a slow reader's buffer fills, and the download then stalls.)
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                inactive_threshold=30.0, mem_storage=True)
        sub = await self._js.pull_subscribe(subject, stream=OBJ_STREAM_TEMPLATE.format(bucket=self.bucket), config=config)
        received = 0
        try:
            while received < info.size:
                try:
                    batch = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except NatsTimeoutError:
                    raise Unavailable(f"blob sha256:{sha256}: no data from the Object Store for {FETCH_TIMEOUT_S}s") from None
                for msg in batch:
                    received += len(msg.data)
                    yield msg.data
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def download(self, sha256: str, dest: BinaryIO) -> tuple[str, int]:
        """Write the blob into ``dest``; return (sha256 hex of what arrived, its size)."""
        digest = hashlib.sha256()
        size = 0
        async for chunk in self.chunks(sha256):
            digest.update(chunk)
            dest.write(chunk)
            size += len(chunk)
        return digest.hexdigest(), size

    async def delete(self, sha256: str) -> bool:
        try:
            await self._store.delete(sha256)
        except (ObjectNotFoundError, NotFoundError):
            return False
        return True

    async def names(self) -> list[str]:
        try:
            return [info.name for info in await self._store.list(ignore_deletes=True)]
        except NotFoundError:
            return []
