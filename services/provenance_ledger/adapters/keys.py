"""The ledger's Ed25519 signing key: made once at first start, kept under service_dir with mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.provenance_ledger.domain.tree_head import public_pem

KEY_FILE = "ledger.key"
PUBLIC_FILE = "ledger.pub"


def load_or_create_key(directory: Path) -> Ed25519PrivateKey:
    path = directory / KEY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            # O_EXCL: two starting processes never overwrite each other's key; 0600 from the first byte.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pem = path.read_bytes()
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    (directory / PUBLIC_FILE).write_text(public_pem(key.public_key()))
    return key
