"""API key records in the JetStream KV bucket ``strata-api-keys``, keyed by the key's public id, so
every service and every replica sees the same keys, and a revocation everywhere within a second
(what a service read is believed for ``RECHECK_S``: a request costs no KV round trip).

Who may do what on NATS (shared/nats_auth.py): the gateway and the ``operator`` credential (the CLI's
``strata key``) write the bucket; model-store, hardware-inventory and the ledger only read it, so they
open it with ``create=False`` and, while it does not exist yet, look again now and then.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared import errors
from shared.apikeys import BOOTSTRAP_NAME, ApiKeyRecord, Scope, hash_key, key_id, new_key, record_for
from shared.nats_auth import API_KEYS_BUCKET, write_private

BUCKET = API_KEYS_BUCKET
LOCAL_KEYS_NAME = "env:STRATA_API_KEYS"
RECHECK_S = 1.0  # how long a read (a record, "no such key", "no key configured", "no bucket yet") is believed
CACHED_IDS = 10_000  # bounded: a flood of made-up keys cannot grow the cache without end


def api_keys_bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=BUCKET, history=4, replicas=replicas, description="Strata API keys (sha256 only)")


class UnreadableRecord(Exception):
    """What the bucket holds under an id is not an API key record."""


class KeyStore:
    def __init__(self, js: JetStreamContext, kv: KeyValue | None, local: list[ApiKeyRecord] | None = None) -> None:
        self.js = js
        self.kv = kv
        # keys this process was given in its environment (the gateway's STRATA_API_KEYS): honoured here
        # only, never written to the bucket, which only the operator credential may write
        self.local = {r.id: r for r in local or []}
        self._empty: tuple[bool, float] | None = None
        self._records: dict[str, tuple[ApiKeyRecord | None, float]] = {}  # id -> (record or None, read at)
        self._looked_for_bucket = time.monotonic()

    @classmethod
    async def open(cls, js: JetStreamContext, *, create: bool = False, local_keys: list[str] | None = None) -> KeyStore:
        """``create``: make the bucket when it is missing (only where NATS has no users: `strata up`
        provisions it). ``local_keys``: raw keys honoured by this process alone, as ``inference`` keys."""
        try:
            kv: KeyValue | None = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(api_keys_bucket_config()) if create else None
        return cls(js, kv, [record_for(k, LOCAL_KEYS_NAME) for k in local_keys or [] if k])

    async def _bucket(self) -> KeyValue | None:
        if self.kv is None and time.monotonic() - self._looked_for_bucket >= RECHECK_S:
            self._looked_for_bucket = time.monotonic()
            try:
                self.kv = await self.js.key_value(BUCKET)
            except BucketNotFoundError:
                return None
        return self.kv

    # -- reads ---------------------------------------------------------------------------------
    async def get(self, id: str) -> ApiKeyRecord | None:
        """The record stored under ``id``; None where there is none, or what is there is no record (it
        grants nothing: a service answers 401 for it, never a 500)."""
        try:
            return await self._read(id)
        except UnreadableRecord:
            return None

    async def _read(self, id: str) -> ApiKeyRecord | None:
        kv = await self._bucket()
        if kv is None:
            return None
        try:
            entry = await kv.get(id)
        except (KeyNotFoundError, InvalidKeyError):  # a deleted key, or an id no key could have (a dot, a space)
            return None
        if entry.value is None:
            return None
        try:
            return ApiKeyRecord.model_validate_json(entry.value)
        except ValidationError as exc:
            raise UnreadableRecord(id, exc.error_count()) from None

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key, or None: a KV get by id (at most one a second per id), then
        the full hash compared."""
        id, now = key_id(key), time.monotonic()
        if (local := self.local.get(id)) is not None and local.matches(key):
            return local
        cached = self._records.get(id)
        if cached is not None and now - cached[1] < RECHECK_S:
            record = cached[0]
        else:
            record = await self.get(id)
            if len(self._records) >= CACHED_IDS:
                self._records.clear()
            self._records[id] = (record, now)
        return record if record is not None and record.matches(key) else None

    async def list(self) -> tuple[list[ApiKeyRecord], list[str]]:
        """Every record, oldest first, and the ids whose value is not a key record."""
        kv = await self._bucket()
        if kv is None:
            return [], []
        try:
            ids = await kv.keys()
        except NoKeysError:
            return [], []
        records: list[ApiKeyRecord] = []
        unreadable: list[str] = []
        for id in ids:
            try:
                if (record := await self._read(id)) is not None:
                    records.append(record)
            except UnreadableRecord:
                unreadable.append(id)
        return sorted(records, key=lambda r: r.created), sorted(unreadable)

    async def is_empty(self, *, fresh: bool = False) -> bool:
        """True while no key was ever configured: the platform is then open. Cached for a second so
        that open mode does not cost a bucket lookup per request."""
        if self.local:
            return False
        cached = self._empty
        if not fresh and cached is not None and time.monotonic() - cached[1] < RECHECK_S:
            return cached[0]
        kv = await self._bucket()
        empty = kv is None or (await kv.status()).values == 0
        self._empty = (empty, time.monotonic())
        return empty

    # -- writes (gateway and operator only) -------------------------------------------------------
    async def add(self, record: ApiKeyRecord) -> bool:
        """Store a record unless one exists for that id (a revoked key stays revoked); True if stored."""
        if self.kv is None:
            raise errors.Unavailable(f"the KV bucket {BUCKET} does not exist yet")
        try:
            await self.kv.create(record.id, record.model_dump_json(exclude={"id"}).encode())
        except KeyWrongLastSequenceError:
            return False
        self._empty = None
        self._records.pop(record.id, None)
        return True

    async def create(
        self,
        name: str,
        scopes: list[Scope] | None = None,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> tuple[str, ApiKeyRecord]:
        """Make a new key, store its hash, and return the key: the only time it is ever seen."""
        for _ in range(3):  # two keys sharing 48 bits of hash is a 2^-48 event; try again rather than fail
            key = new_key()
            record = record_for(
                key, name, scopes, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute
            )
            if await self.add(record):
                return key, record
        raise errors.Conflict("could not find a free key id")

    async def revoke(self, id: str) -> ApiKeyRecord:
        record = await self.get(id)
        if record is None or self.kv is None:
            raise errors.NotFound(f"no API key with id {id!r} (see `strata key ls`)")
        if not record.revoked:
            record.revoked, record.revoked_at = True, datetime.now(timezone.utc)
            await self.kv.put(record.id, record.model_dump_json(exclude={"id"}).encode())
        self._records.pop(record.id, None)
        return record

    @staticmethod
    def hash(key: str) -> str:
        return hash_key(key)


async def ensure_admin_key(store: KeyStore, path: Path) -> str | None:
    """While no key exists at all, make an admin key named ``bootstrap-admin``, write it to ``path``
    (mode 0600 from the first byte) and return it; otherwise None. The file is written before the
    key is stored, so a failed write cannot leave a platform closed with a key nobody has."""
    if not await store.is_empty(fresh=True):
        return None
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, key + "\n")
    try:
        stored = await store.add(record_for(key, BOOTSTRAP_NAME, ["admin"]))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not stored:  # a 2^-48 id clash: nothing was stored under this key
        path.unlink(missing_ok=True)
        return None
    return key
