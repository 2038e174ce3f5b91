"""Ed25519 signing keys kept on disk, and the ids that name them.

model-store signs manifests and the ledger signs tree heads, each with a key made at its first start and
kept under its service dir. Two processes may start at once on the same dir (a restart overlapping the
old process, two replicas sharing a volume): whichever links its key into place first wins, and the
other loads that key. The key file is never seen half written, because it only ever appears by a
hard link to a complete, fsynced file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import StrataError


class KeyFileError(StrataError):
    """A key file that cannot be used as it is; the message says what to do."""


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path`` (PEM, PKCS#8, mode 0600), made there first if there is none."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pem = _create(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        key = exc
    if not isinstance(key, Ed25519PrivateKey):
        # Never replaced: what the key signed would no longer verify under a new one.
        raise KeyFileError(f"{path}: not a PEM Ed25519 private key ({_what(key)}); restore it, or move it away "
                           "to start with a new key (what the old key signed then no longer verifies)")
    return key


def _create(path: Path) -> bytes:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per thread, too
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)  # atomic and never replaces: of two starts at once, the first key wins
        except FileExistsError:
            pass
    finally:
        temp.unlink(missing_ok=True)
    return path.read_bytes()


def _what(loaded: object) -> str:
    return f"{loaded}".split(". See https://")[0] if isinstance(loaded, Exception) else f"a {type(loaded).__name__}"


def key_id(public: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key: the DSSE ``keyid`` of model-store's signatures."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def short_key_id(public: Ed25519PublicKey) -> str:
    """The first 16 bytes of ``key_id`` (32 hex digits): the ledger's key id, inside every signed tree
    head's bytes, so it keeps this length."""
    return key_id(public)[:32]

