"""Canonical JSON: the bytes every digest and signature in Strata is computed over.

Sorted keys, no whitespace, UTF-8 as is (``ensure_ascii=False``). model-store's manifest digests and
DSSE payloads and the ledger's leaves are all these bytes, so they must not change for any input they
already hold. NaN and ±Infinity are refused: JSON has no spelling for them, and Python's own (``NaN``)
is one no other verifier would rebuild.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from shared.errors import Invalid


class NotCanonical(Invalid, ValueError):
    """The value has no canonical JSON form (a NaN or an infinity in it)."""


def canonical_json(value: Any) -> bytes:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise NotCanonical(f"not canonical JSON: {exc} (NaN and ±Infinity have no JSON form)") from None
