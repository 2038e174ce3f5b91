"""Signing and checking tree heads: the ledger's Ed25519 signature over (tree size, root hash, time).

The signed bytes and the TreeHead model are the ledger's contract (shared/provenance.py).
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.provenance import TreeHead, signed_bytes
from shared.signing_keys import short_key_id


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
