"""API key records in the JetStream KV bucket ``strata-api-keys``, keyed by the key's sha256, so every
gateway replica sees the same keys and a revocation everywhere at once."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.api_gateway.domain.keys import ApiKeyRecord, hash_key, new_key, record_for

BUCKET = "strata-api-keys"
EMPTY_CACHE_S = 1.0  # how long "no key configured" is believed before the bucket is asked again


class KeyStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._empty: tuple[bool, float] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext) -> KeyStore:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=BUCKET, history=4, description="Strata API keys (sha256 only)")
        return cls(kv)

    async def get(self, key_hash: str) -> ApiKeyRecord | None:
        try:
            entry = await self.kv.get(key_hash)
        except KeyNotFoundError:  # also covers a deleted key
            return None
        return None if entry.value is None else ApiKeyRecord.model_validate_json(entry.value)

    async def add(self, record: ApiKeyRecord) -> bool:
        """Store a record unless one exists for that hash (a revoked key stays revoked); True if stored."""
        try:
            await self.kv.create(record.key_hash, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        self._empty = None
        return True

    async def create(self, name: str) -> str:
        """Make a new key, store its hash, and return the key: the only time it is ever seen."""
        key = new_key()
        await self.add(record_for(key, name))
        return key

    async def revoke(self, key_hash: str) -> bool:
        record = await self.get(key_hash)
        if record is None:
            return False
        record.revoked, record.revoked_at = True, datetime.now(timezone.utc)
        await self.kv.put(key_hash, record.model_dump_json().encode())
        return True

    async def is_empty(self) -> bool:
        """True while no key was ever configured: the gateway is then open. Cached for a second so
        that open mode does not cost a bucket lookup per request."""
        cached = self._empty
        if cached is not None and time.monotonic() - cached[1] < EMPTY_CACHE_S:
            return cached[0]
        status = await self.kv.status()
        empty = status.values == 0
        self._empty = (empty, time.monotonic())
        return empty

    async def seed(self, keys: list[str], name: str = "env:STRATA_API_KEYS") -> int:
        return sum([await self.add(record_for(k, name)) for k in keys if k])

    @staticmethod
    def hash(key: str) -> str:
        return hash_key(key)
