"""HTTP API keys, one definition for the whole platform (the gateway and every admin API).

A key is a 256-bit random secret shown once, when it is made; at rest there is only its sha256, in
the JetStream KV bucket ``strata-api-keys`` (shared/apikey_store.py). A record carries a short public
``id`` (the first 12 hex digits of that sha256: what ``strata key ls`` shows and ``revoke`` takes),
its scopes and its quotas. Scopes: ``inference`` (the gateway's /v1 API, and the ledger's receipts of
the key's own requests), ``read`` (the ledger's leaf contents: leaves, receipts, lineage, audit, exports)
and ``admin`` (the mutating routes of model-store, hardware-inventory and the ledger); ``admin`` implies
the others.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, computed_field

KEY_PREFIX = "sk-strata-"
ID_LENGTH = 12
Scope = Literal["inference", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "read", "admin")
BOOTSTRAP_NAME = "bootstrap-admin"
KEY_ENV = "STRATA_API_KEY"


def key_file(data_dir: Path) -> Path:
    """Where `strata up` writes the admin key it makes at first start (mode 0600)."""
    return data_dir / "api-key"


def local_key(environ: dict[str, str] | None = None) -> str | None:
    """The key a `strata` command on this machine sends: $STRATA_API_KEY, else the one `strata up`
    wrote into the data dir ($STRATA_DATA_DIR, default .strata) where this user may read it."""
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return env[KEY_ENV]
    from shared.config import data_dir_from_env

    try:
        return key_file(data_dir_from_env(env)).read_text().strip() or None
    except OSError:
        return None


class ApiKeyRecord(BaseModel):
    """What is kept at rest for one key: never the key itself."""

    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field(min_length=1, max_length=200)
    # A record written before scopes existed was a gateway key: it keeps exactly that power.
    scopes: list[Scope] = Field(default_factory=lambda: ["inference"], min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1, description="None: unlimited")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="None: unlimited")
    created: datetime
    revoked: bool = False
    revoked_at: datetime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def id(self) -> str:
        return key_id_of_hash(self.key_hash)

    def grants(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def matches(self, key: str) -> bool:
        """Whether ``key`` is this record's key (constant-time: the hash is compared, not the id)."""
        return hmac.compare_digest(self.key_hash, hash_key(key))


def new_key() -> str:
    """256 bits from the OS's CSPRNG: a plain sha256 is a sound hash at rest for a secret this strong
    (a slow password hash is for low-entropy, human-chosen secrets; nobody can guess 2^256 inputs)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of_hash(key_hash: str) -> str:
    return key_hash[:ID_LENGTH]


def key_id(key: str) -> str:
    """The public id of a key: safe to log and show (48 bits of its hash reveal nothing usable)."""
    return key_id_of_hash(hash_key(key))


def record_for(key: str, name: str, scopes: list[Scope] | None = None, *, requests_per_minute: int | None = None,
               tokens_per_minute: int | None = None) -> ApiKeyRecord:
    return ApiKeyRecord(key_hash=hash_key(key), name=name, scopes=scopes or ["inference"],
                        requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                        created=datetime.now(timezone.utc))


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
