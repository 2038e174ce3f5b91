"""The registry's replicated state in a JetStream KV bucket, changed only by compare-and-set.

Keys: ``node.<id>`` (a NodeRecord), ``allocations`` (every deployment and the memory it books, one
document so that one revision-checked write books all replicas of a deployment at once or none), and
``correction.<arch>.<dtype>.<kind>``. Every change is ``read -> change -> update(last=revision)``;
when another writer (a racing request, another registry replica) got there first the update fails
and the change is recomputed on the fresh value. Two requests therefore never book the same bytes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from services.hardware_inventory.domain.model import Allocations
from shared import subjects
from shared.errors import Conflict
from shared.inventory import Correction, NodeRecord
from shared.nats_auth import INVENTORY_BUCKET

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
ALLOCATIONS = "allocations"
MAX_ATTEMPTS = 64


class Unchanged(Exception):
    """Raised by a change function to leave the value as it is (nothing to write)."""


def inventory_bucket_config(replicas: int = 1, bucket: str = INVENTORY_BUCKET) -> KeyValueConfig:
    return KeyValueConfig(bucket=bucket, history=5, storage=StorageType.FILE, replicas=replicas)


class InventoryState:
    def __init__(self, kv: KeyValue, js: JetStreamContext, bucket: str) -> None:
        self.kv, self.js, self.bucket = kv, js, bucket
        self.conflicts = 0  # CAS retries, for tests and health

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, replicas: int = 1) -> InventoryState:
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(inventory_bucket_config(replicas, bucket))
        return cls(kv, js, bucket)

    async def keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (deleted ones included: their reads are None). From the stream's
        subject counts, not ``kv.keys()``: that makes a consumer per call, and the liveness check lists
        the nodes several times a second; under load the consumers piled up to the server's limit."""
        info = await self.js.stream_info(
            subjects.kv_stream(self.bucket), subjects_filter=subjects.kv_writes(self.bucket, prefix)
        )
        return [subjects.kv_key_of(self.bucket, subject) for subject in (info.state.subjects or {})]

    async def read(self, key: str, model: type[T]) -> tuple[T | None, int]:
        """The value and its revision (0: the key does not exist)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if entry.value is None or not entry.value:
            return None, 0
        return model.model_validate_json(entry.value), entry.revision or 0

    async def change(self, key: str, model: type[T], fn: Callable[[T | None], tuple[T, R]]) -> R:
        """Apply ``fn`` (current value -> new value, result) with compare-and-set, retrying on conflict.
        ``fn`` must be pure: it may run several times. Raising Unchanged(result) skips the write."""
        for attempt in range(MAX_ATTEMPTS):
            current, revision = await self.read(key, model)
            try:
                new, result = fn(current)
            except Unchanged as skip:
                return skip.args[0] if skip.args else None  # type: ignore[return-value]
            data = new.model_dump_json().encode()
            try:
                if revision == 0:
                    await self.kv.create(key, data)
                else:
                    await self.kv.update(key, data, last=revision)
                return result
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                await asyncio.sleep(
                    random.uniform(0, 0.005 * min(attempt + 1, 20))
                )  # jitter: racing writers desynchronise
        raise Conflict(f"{key}: still conflicting after {MAX_ATTEMPTS} compare-and-set attempts")

    # -- typed views ---------------------------------------------------------------------------
    async def nodes(self) -> list[NodeRecord]:
        records = await asyncio.gather(*(self.read(k, NodeRecord) for k in await self.keys("node.")))
        return sorted((r for r, _ in records if r is not None), key=lambda n: n.node_id)

    async def node(self, node_id: str) -> NodeRecord | None:
        return (await self.read(node_key(node_id), NodeRecord))[0]

    async def allocations(self) -> Allocations:
        return (await self.read(ALLOCATIONS, Allocations))[0] or Allocations()

    async def change_allocations(self, fn: Callable[[Allocations], tuple[Allocations, R]]) -> R:
        return await self.change(ALLOCATIONS, Allocations, lambda current: fn(current or Allocations()))

    async def corrections(self) -> list[Correction]:
        records = await asyncio.gather(*(self.read(k, Correction) for k in await self.keys("correction.")))
        return [r for r, _ in records if r is not None]

    async def correction(self, key: str) -> Correction | None:
        return (await self.read(f"correction.{key}", Correction))[0]


def node_key(node_id: str) -> str:
    return "node." + "".join(c if c.isalnum() or c in "-_" else "_" for c in node_id)
