"""The bytes of a leaf: canonical JSON, the same on every machine.

A leaf is ``{"event": <the envelope as published>, "index": <leaf index>}`` serialised with sorted
keys, no whitespace and UTF-8 (``ensure_ascii=False``). The envelope is the event exactly as it was
published (parsed from the stored bytes and re-serialised, so key order and spacing of the publisher
do not matter). The index inside the leaf binds each event to its position: a row moved to another
place in storage says so itself, and a receipt cannot be replayed for another index.
"""

from __future__ import annotations

import json
from typing import Any

LEAF_FORMAT = "strata.ledger.leaf.v1"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def leaf_bytes(envelope: dict[str, Any], index: int) -> bytes:
    return canonical_json({"event": envelope, "index": index})


def parse_leaf(data: bytes) -> tuple[dict[str, Any], int]:
    """The envelope and index a leaf holds; ValueError if it is not a leaf."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or set(obj) != {"event", "index"} or not isinstance(obj["index"], int):
        raise ValueError("not a ledger leaf: expected an object with exactly 'event' and 'index'")
    if not isinstance(obj["event"], dict):
        raise ValueError("not a ledger leaf: 'event' is not an object")
    return obj["event"], obj["index"]
