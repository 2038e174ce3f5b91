"""Reading the admission policy file (YAML, ``STRATA_ADMISSION_POLICY``).

A missing file means no policy (every model admitted; the caller logs it). Anything else wrong
raises PolicyFileError naming the file and the key: an unknown key (a typo), a wrong type, a bad
label selector, a trusted key that is neither an Ed25519 PEM nor a readable PEM file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from services.hardware_inventory.domain.policy import AdmissionPolicy, PolicyFileError, PolicyRules, TrustedKey
from shared.dsse import load_pem_public_key


def load_policy(path: Path) -> AdmissionPolicy | None:
    """The policy in ``path``, or None when there is no such file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyFileError(f"admission policy {path}: cannot be read ({exc.strerror})") from None
    try:
        content = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"admission policy {path}: not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise PolicyFileError(
            f"admission policy {path}: expected a mapping of rules at the top, found {type(content).__name__}"
        )
    try:
        rules = PolicyRules.model_validate(content)
    except ValidationError as exc:
        problems = "; ".join(f"{_key(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise PolicyFileError(f"admission policy {path}: {problems}") from None
    keys = [_trusted_key(entry, i, path) for i, entry in enumerate(rules.trusted_keys)]
    return AdmissionPolicy.of(rules, keys, raw, source=str(path))


def _key(loc: tuple) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc]
    return "".join(p if p.startswith("[") else f".{p}" for p in parts).lstrip(".") or "(top level)"


def _trusted_key(entry: str, index: int, policy_path: Path) -> TrustedKey:
    where = f"admission policy {policy_path}: trusted_keys[{index}]"
    if entry.lstrip().startswith("-----BEGIN"):
        text, source = entry, f"trusted_keys[{index}]"
    else:
        key_path = Path(entry).expanduser()
        if not key_path.is_absolute():  # relative to the policy file, so a policy and its keys move together
            key_path = policy_path.parent / key_path
        try:
            text, source = key_path.read_text(), str(key_path)
        except OSError as exc:
            raise PolicyFileError(f"{where}: {key_path} cannot be read ({exc.strerror})") from None
    try:
        return TrustedKey(load_pem_public_key(text), source)
    except ValueError as exc:
        raise PolicyFileError(f"{where}: {exc}") from None
