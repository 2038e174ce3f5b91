"""API keys: high-entropy random secrets that are only ever stored as their sha256."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone

from pydantic import BaseModel, Field

KEY_PREFIX = "sk-strata-"


class ApiKeyRecord(BaseModel):
    """What is kept at rest for one key: never the key itself."""

    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str
    created: datetime
    revoked: bool = False
    revoked_at: datetime | None = None


def new_key() -> str:
    """256 bits from the OS's CSPRNG: a plain sha256 is a sound hash at rest for a secret this strong
    (a slow password hash is for low-entropy, human-chosen secrets)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def record_for(key: str, name: str) -> ApiKeyRecord:
    return ApiKeyRecord(key_hash=hash_key(key), name=name, created=datetime.now(timezone.utc))


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
