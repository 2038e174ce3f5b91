"""Content-addressed blobs in the JetStream Object Store: the object's name is its sha256 (hex).

Uploads read a file object chunk by chunk (nats-py's ``put``), downloads iterate the object's
chunks through a pull consumer a batch at a time, so neither direction holds a whole file in memory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO

from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE, OBJ_STREAM_TEMPLATE, ObjectStore

from shared.catalog import BLOB_BUCKET
from shared.errors import BlobCorrupt, InsufficientStorage, NotFound, Unavailable

FETCH_BATCH = 32  # 128 KiB chunks: 4 MiB in flight per download
FETCH_TIMEOUT_S = 20.0
# JetStream's err_codes for a write that does not fit: past the account's storage limit, the server's
# (max_file_store), or its resources. 10077 (the store failed) means it too when the reason is a
# stream's max_bytes or a full disk; other store failures stay what they are.
OUT_OF_ROOM_CODES = frozenset({10002, 10023, 10047})
STORE_FAILED_CODE = 10077
OUT_OF_ROOM_REASONS = ("maximum bytes exceeded", "no space left on device")


def blob_store_config(replicas: int = 1, bucket: str = BLOB_BUCKET) -> ObjectStoreConfig:
    return ObjectStoreConfig(bucket=bucket, description="Strata model-store blobs (sha256-named)", replicas=replicas)


class BlobStore:
    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str) -> None:
        self._js = js
        self._store = store
        self.bucket = bucket

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, create: bool = False, bucket: str = BLOB_BUCKET, replicas: int = 1
    ) -> BlobStore:
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
        """Store the blob; InsufficientStorage when JetStream refuses a chunk for want of room. The put
        has purged the chunks it wrote by then (model-store may purge its own blob store), so a refused
        blob leaves nothing behind."""
        try:
            info = await self._store.put(sha256, stream)
        except APIError as exc:
            if not _out_of_room(exc):
                raise
            raise InsufficientStorage(
                f"blob sha256:{sha256}: JetStream refused it part-way ({exc.description}); "
                "the chunks it had taken were removed"
            ) from None
        return info.size or 0

    async def room(self) -> int | None:
        """Bytes the blob store may still take under the JetStream limits a client can read: the stream's
        max_bytes and the account's max_storage; None when neither is set. (The server's own limit,
        max_file_store, is not visible to a client: a write past it is refused, see ``put_file``.)"""
        stream = await self._js.stream_info(OBJ_STREAM_TEMPLATE.format(bucket=self.bucket))
        account = await self._js.account_info()
        left = []
        if stream.config.max_bytes is not None and stream.config.max_bytes >= 0:
            left.append(stream.config.max_bytes - stream.state.bytes)
        if account.limits.max_storage is not None and account.limits.max_storage >= 0:
            left.append(account.limits.max_storage - account.storage)
        return max(0, min(left)) if left else None

    async def put_path(self, sha256: str, path: Path) -> int:
        with path.open("rb") as f:
            return await self.put_file(sha256, f)

    async def chunks(self, sha256: str) -> AsyncGenerator[bytes, None]:
        """The blob's bytes, chunk by chunk, checked against the store's own record of the object
        (chunk count, size, digest): BlobCorrupt when they disagree. The last chunk is held back
        until the whole blob has checked out, so no reader ever receives all of a corrupt blob.
        (Whether the content is the one a manifest names is the caller's check.)"""
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
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0, mem_storage=True
        )
        sub = await self._js.pull_subscribe(
            subject, stream=OBJ_STREAM_TEMPLATE.format(bucket=self.bucket), config=config
        )
        try:
            stored = (await sub.consumer_info()).num_pending
            expected_chunks = info.chunks or stored  # a record without a count: the size and digest still tell
            if stored != expected_chunks:
                # said now: waiting for a chunk that is gone would read as an outage after FETCH_TIMEOUT_S
                raise BlobCorrupt.of(
                    sha256, f"it was stored as {expected_chunks} chunks, the Object Store holds {stored}"
                )
            check = _RecordCheck(sha256, info.size, info.digest)
            held: bytes | None = None
            while check.chunks < expected_chunks:
                try:
                    batch = await sub.fetch(min(FETCH_BATCH, expected_chunks - check.chunks), timeout=FETCH_TIMEOUT_S)
                except NatsTimeoutError:
                    raise Unavailable(
                        f"blob sha256:{sha256}: no data from the Object Store for {FETCH_TIMEOUT_S}s"
                    ) from None
                for msg in batch:
                    check.add(msg.data)
                    if held is not None:
                        yield held
                    held = msg.data
            check.finish()
            if held is not None:
                yield held
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def check(self, sha256: str) -> int:
        """Read the whole blob through the checks of ``chunks``; its size, or BlobCorrupt / NotFound."""
        size = 0
        async for chunk in self.chunks(sha256):
            size += len(chunk)
        return size

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


class _RecordCheck:
    """What arrives, against the Object Store's record of the object (written by the put that stored it)."""

    def __init__(self, sha256: str, size: int, digest: str | None) -> None:
        self.sha256, self.size, self.recorded_digest = sha256, size, digest
        self.chunks = self.received = 0
        self.digest = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.chunks += 1
        self.received += len(data)
        self.digest.update(data)
        if self.received > self.size:
            raise BlobCorrupt.of(self.sha256, f"its chunks hold more than the {self.size} bytes it was stored with")

    def finish(self) -> None:
        if self.received != self.size:
            raise BlobCorrupt.of(self.sha256, f"its chunks hold {self.received} bytes, it was stored with {self.size}")
        recorded = _digest_bytes(self.recorded_digest)
        if recorded is not None and self.digest.digest() != recorded:
            raise BlobCorrupt.of(
                self.sha256,
                f"its chunks have digest sha256:{self.digest.hexdigest()}, it was stored with sha256:{recorded.hex()}",
            )


def _out_of_room(exc: APIError) -> bool:
    if exc.err_code in OUT_OF_ROOM_CODES:
        return True
    return exc.err_code == STORE_FAILED_CODE and any(
        reason in (exc.description or "") for reason in OUT_OF_ROOM_REASONS
    )


def _digest_bytes(recorded: str | None) -> bytes | None:
    """The Object Store's "SHA-256=<base64url>" digest as bytes (padded or not: Go and Python clients
    differ); None when the record has none."""
    if not recorded or not recorded.upper().startswith(OBJ_DIGEST_TYPE):
        return None
    text = recorded[len(OBJ_DIGEST_TYPE) :]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
