"""Where the per-key quota state (domain/quotas.py ``KeyUsage``) lives: the JetStream KV bucket
``strata-quotas``, shared by every gateway replica, one value per API key id, changed only by
compare-and-set (``read -> change -> update(last=revision)``; a writer that lost the race recomputes
its change on the fresh value). The read is skipped when this replica holds the key's last value it
wrote or read: a stale guess only costs a conflict, and one replica serving a key (the usual case)
pays one round trip per change instead of two. An in-memory twin serves the unit tests.

Values expire ``QUOTA_TTL_S`` after their last write. An expired value reads as a full bucket, which
is what it had become anyway unless the key owed more than an hour of its quota; that debt is
forgiven. The TTL must outlive any request holding a reservation (``GatewayConfig`` checks it).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Protocol

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import errors
from shared.nats_auth import QUOTAS_BUCKET

from services.api_gateway.domain.quotas import KeyUsage

QUOTA_TTL_S = 3600.0
MAX_ATTEMPTS = 64
REMEMBERED_KEYS = 10_000  # last values kept for skipping reads; past this the memory starts afresh
Change = Callable[[KeyUsage | None], KeyUsage]


class QuotaStoreUnavailable(errors.Unavailable):
    """The shared quota counters cannot be read or written: a metered key is refused (fail closed)
    rather than served unmetered."""

    code = "quota_store_unavailable"


class QuotaCounters(Protocol):
    async def change(self, key_id: str, fn: Change) -> KeyUsage:
        """Apply ``fn`` (current value -> new value) atomically and return the new value. ``fn`` must be
        pure (it may run several times); an exception from it (QuotaExceeded) writes nothing."""
        ...


def quota_bucket_config(replicas: int) -> KeyValueConfig:
    """The one definition of the bucket, for whoever provisions it."""
    return KeyValueConfig(
        bucket=QUOTAS_BUCKET, description="Strata per-key quota counters (api-gateway)", history=1, ttl=QUOTA_TTL_S,
        max_value_size=1024, storage=StorageType.FILE, replicas=replicas,
        direct=True)  # reads from any replica: a stale one only costs a compare-and-set conflict


class InMemoryQuotaCounters:
    """One process's counters: for tests of the rules without NATS."""

    def __init__(self) -> None:
        self.values: dict[str, KeyUsage] = {}

    async def change(self, key_id: str, fn: Change) -> KeyUsage:
        self.values[key_id] = new = fn(self.values.get(key_id))
        return new


class KvQuotaCounters:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.conflicts = 0  # compare-and-set retries, for tests and the bench
        self._last: dict[str, tuple[KeyUsage | None, int]] = {}  # key id -> (value, revision) last seen here

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1, create: bool = False) -> KvQuotaCounters:
        try:
            try:
                return cls(await js.key_value(QUOTAS_BUCKET))
            except BucketNotFoundError:
                if not create:
                    raise QuotaStoreUnavailable(f"the quota bucket {QUOTAS_BUCKET} does not exist") from None
                return cls(await js.create_key_value(quota_bucket_config(replicas)))
        except NatsError as exc:
            raise QuotaStoreUnavailable(f"the quota bucket {QUOTAS_BUCKET} cannot be opened: {exc!r}") from None

    async def _read(self, key_id: str) -> tuple[KeyUsage | None, int]:
        try:
            entry = await self.kv.get(key_id)
        except KeyNotFoundError:  # never written, expired, or deleted
            return None, 0
        return (KeyUsage.model_validate_json(entry.value) if entry.value else None), entry.revision or 0

    async def change(self, key_id: str, fn: Change) -> KeyUsage:
        for attempt in range(MAX_ATTEMPTS):
            try:
                remembered = self._last.pop(key_id, None)
                current, revision = remembered if remembered is not None else await self._read(key_id)
                try:
                    new = fn(current)
                except Exception:
                    if remembered is None:
                        raise
                    continue  # refused on a guess (another replica may have refunded since): judge the stored value
                data = new.model_dump_json().encode()
                if revision == 0:
                    written = await self.kv.create(key_id, data)
                else:
                    written = await self.kv.update(key_id, data, last=revision)
                if len(self._last) >= REMEMBERED_KEYS:
                    self._last.clear()
                self._last[key_id] = (new, written)
                return new
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                await asyncio.sleep(
                    random.uniform(0, 0.002 * min(attempt + 1, 20))
                )  # jitter: racing writers desynchronise
            except NatsError as exc:
                raise QuotaStoreUnavailable(
                    f"the quota counters cannot be reached, so a metered key cannot be "
                    f"held to its quota ({type(exc).__name__})"
                ) from None
        raise QuotaStoreUnavailable(
            f"the quota counters of key {key_id} are still contended after {MAX_ATTEMPTS} attempts"
        )
