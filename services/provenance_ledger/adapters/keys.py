"""The ledger's Ed25519 signing key: made once at first start, kept under service_dir with mode 0600
(shared/signing_keys.py), its public half beside it for verifiers that hold no private key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.provenance_ledger.domain.tree_head import public_pem
from shared.signing_keys import load_or_create_private_key

KEY_FILE = "ledger.key"
PUBLIC_FILE = "ledger.pub"


def load_or_create_key(directory: Path) -> Ed25519PrivateKey:
    key = load_or_create_private_key(directory / KEY_FILE)
    (directory / PUBLIC_FILE).write_text(public_pem(key.public_key()))
    return key
