"""Verifying signed manifests: an in-toto Statement v1 in a DSSE envelope, signed with Ed25519.

This is the shape OpenSSF model-signing produces (subjects are file paths with their sha256), so
in-toto and DSSE tooling can read it. The predicate is the manifest itself; verification checks
the signature over DSSE's pre-authentication encoding, then that the statement's predicate and
subjects are exactly the manifest the caller holds. model-store signs (its ``Signer``); the worker,
the CLI and hardware-inventory's admission policy verify with the functions here.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.catalog import (
    DATASET_PREDICATE_TYPE, DSSE_PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE, DatasetManifest, ModelManifest,
    PublicKey, ResolvedModel, manifest_digest,
)
from shared.canonical import canonical_json
from shared.errors import StrataError
from shared.signing_keys import key_id


class VerificationError(StrataError):
    """An artifact failed its digest or signature check; the message names what failed."""

    code, http_status = "verification_failed", 422


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: "DSSEv1" SP len(type) SP type SP len(body) SP body."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def statement(manifest: ModelManifest | DatasetManifest) -> dict[str, Any]:
    predicate_type = PREDICATE_TYPE if manifest.kind == "model" else DATASET_PREDICATE_TYPE
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f.path, "digest": {"sha256": f.sha256}} for f in manifest.files],
        "predicateType": predicate_type,
        "predicate": manifest.model_dump(mode="json"),
    }


def public_key_info(public: Ed25519PublicKey) -> PublicKey:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(key_id=key_id(public), public_key=base64.b64encode(raw).decode(), pem=pem.decode())


def load_public_key(info: PublicKey) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(info.public_key))


def load_pem_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 SubjectPublicKeyInfo PEM; ValueError says why not."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key (a {type(key).__name__})")
    return key


def envelope_key_ids(envelope: dict[str, Any]) -> list[str]:
    """The key ids the envelope's signatures claim (unverified: for messages)."""
    signatures = envelope.get("signatures") if isinstance(envelope, dict) else None
    return (
        [str(s.get("keyid")) for s in signatures if isinstance(s, dict) and s.get("keyid")]
        if isinstance(signatures, list)
        else []
    )


def verify_envelope(
    envelope: dict[str, Any],
    manifest: ModelManifest | DatasetManifest,
    public: Ed25519PublicKey,
    *,
    signer: str = "model-store key",
) -> None:
    """Raise VerificationError unless the envelope is a valid signature, by this key, of this manifest."""
    what = f"{manifest.kind} {manifest.name}" + (f":{manifest.version}" if manifest.kind == "model" else "")
    try:
        payload_type = envelope["payloadType"]
        body = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope["signatures"]
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"{what}: the signature envelope is malformed ({exc})") from None
    if payload_type != DSSE_PAYLOAD_TYPE:
        raise VerificationError(f"{what}: payloadType {payload_type!r} is not {DSSE_PAYLOAD_TYPE}")
    wanted = key_id(public)
    good = False
    for entry in signatures if isinstance(signatures, list) else []:
        if not isinstance(entry, dict) or entry.get("keyid") not in (wanted, None, ""):
            continue
        try:
            public.verify(base64.b64decode(entry.get("sig", "")), pae(payload_type, body))
            good = True
            break
        except (InvalidSignature, ValueError):
            continue
    if not good:
        raise VerificationError(f"{what}: no valid signature by {signer} {wanted[:16]}… over the manifest")
    try:
        signed = json.loads(body)
    except ValueError:
        raise VerificationError(f"{what}: the signed payload is not JSON") from None
    if canonical_json(signed) != canonical_json(statement(manifest)):
        raise VerificationError(
            f"{what}: the manifest differs from the one that was signed (files, digests or metadata changed)"
        )


def verify_resolved(resolved: ResolvedModel, public: Ed25519PublicKey, *, signer: str = "model-store key") -> None:
    """The manifest is the one its digest names, and ``public`` signed exactly it."""
    manifest, model = resolved.manifest, resolved.model
    if (manifest.name, manifest.version) != (model.name, model.version):
        raise VerificationError(f"{model.name}:{model.version}: the manifest is for {manifest.name}:{manifest.version}")
    digest = manifest_digest(manifest)
    if digest != model.digest:
        raise VerificationError(
            f"{model.name}:{model.version}: the manifest's digest is {digest}, not {model.digest}: it was changed"
        )
    verify_envelope(resolved.signature, manifest, public, signer=signer)
