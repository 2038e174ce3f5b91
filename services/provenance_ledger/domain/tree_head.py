"""Signed tree heads: the ledger's Ed25519 signature over (tree size, root hash, time).

The signed bytes are a fixed, versioned text so any tool can rebuild them:
``strata.ledger.sth.v1\\n<key id>\\n<tree size>\\n<root hash hex>\\n<timestamp ms>\\n``. The key id is
``short_key_id`` (shared/signing_keys.py): the first 16 bytes (hex) of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from shared.signing_keys import short_key_id

STH_FORMAT = "strata.ledger.sth.v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


class TreeHead(BaseModel):
    """A signed tree head, as kept, served, published and embedded in receipts."""

    model_config = ConfigDict(frozen=True)
    tree_size: int = Field(ge=0)
    root_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 Merkle root")
    timestamp_ms: int = Field(ge=0, description="when it was signed, ms since the Unix epoch")
    key_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    signature: str = Field(description="base64 Ed25519 signature over signed_bytes()")

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.key_id, self.tree_size, self.root_hash, self.timestamp_ms)

    @property
    def signed_at(self) -> datetime:
        return ms_to_datetime(self.timestamp_ms)


def signed_bytes(key_id: str, tree_size: int, root_hash: str, timestamp_ms: int) -> bytes:
    return f"{STH_FORMAT}\n{key_id}\n{tree_size}\n{root_hash}\n{timestamp_ms}\n".encode()


def datetime_to_ms(when: datetime) -> int:
    return (when - _EPOCH) // _MS


def ms_to_datetime(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_pem(pem: str | bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the ledger key is Ed25519, this is {type(key).__name__}")
    return key


def sign_head(private_key: Ed25519PrivateKey, tree_size: int, root: bytes, timestamp_ms: int) -> TreeHead:
    kid = short_key_id(private_key.public_key())
    root_hex = root.hex()
    signature = private_key.sign(signed_bytes(kid, tree_size, root_hex, timestamp_ms))
    return TreeHead(
        tree_size=tree_size, root_hash=root_hex, timestamp_ms=timestamp_ms, key_id=kid,
        signature=base64.b64encode(signature).decode(),
    )


def head_signature_problem(head: TreeHead, public_key: Ed25519PublicKey) -> str | None:
    """None when ``head`` carries a valid signature by ``public_key``; else why not."""
    if head.key_id != short_key_id(public_key):
        return f"signed by key {head.key_id}, not by this ledger key {short_key_id(public_key)}"
    try:
        signature = base64.b64decode(head.signature, validate=True)
    except ValueError:
        return "the signature is not base64"
    try:
        public_key.verify(signature, head.signed_bytes())
    except InvalidSignature:
        return "the signature does not match the tree head"
    return None
