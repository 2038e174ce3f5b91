"""model-store's signing key: manifests become an in-toto Statement v1 in a DSSE envelope, signed
with Ed25519. Verification (and the envelope's shapes) live in shared/dsse.py, which every verifier
uses; the names are re-exported here for model-store's callers.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.canonical import canonical_json
from shared.catalog import DSSE_PAYLOAD_TYPE, DatasetManifest, ModelManifest, PublicKey
from shared.dsse import (  # noqa: F401  (re-exported)
    VerificationError, load_public_key, pae, public_key_info, statement, verify_envelope,
)
from shared.signing_keys import key_id, load_or_create_private_key


class Signer:
    """model-store's Ed25519 key, made once under the service dir (mode 0600) and kept there."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        return cls(load_or_create_private_key(path))

    def public_key_info(self) -> PublicKey:
        return public_key_info(self.public)

    def sign(self, manifest: ModelManifest | DatasetManifest) -> dict[str, Any]:
        body = canonical_json(statement(manifest))
        sig = self._private.sign(pae(DSSE_PAYLOAD_TYPE, body))
        return {
            "payloadType": DSSE_PAYLOAD_TYPE,
            "payload": base64.b64encode(body).decode(),
            "signatures": [{"keyid": self.key_id, "sig": base64.b64encode(sig).decode()}],
        }
