"""The bytes of a leaf: canonical JSON, the same on every machine.

A leaf is ``{"event": <the envelope as published>, "index": <leaf index>}`` as canonical JSON
(shared/canonical.py: sorted keys, no whitespace, UTF-8 with ``ensure_ascii=False``). The envelope is the
event exactly as it was
published (parsed from the stored bytes and re-serialised, so key order and spacing of the publisher
do not matter). The index inside the leaf binds each event to its position: a row moved to another
place in storage says so itself, and a receipt cannot be replayed for another index.

An event whose id is already in the log with *other* content (#19: an id reused after JetStream's
duplicate window, which the services still act on) is a leaf of its own with one more key,
``"conflict_of": <index of the first leaf with that id>``. The mark is inside the hashed bytes, so it
cannot be added or removed unnoticed; leaves without it (all leaves written before) are unchanged.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from shared.canonical import canonical_json

LEAF_FORMAT = "strata.ledger.leaf.v1"
_PLAIN, _MARKED = {"event", "index"}, {"event", "index", "conflict_of"}


class Leaf(NamedTuple):
    event: dict[str, Any]
    index: int
    conflict_of: int | None  # the first leaf with this event id, when this one reuses it with other content


def leaf_bytes(envelope: dict[str, Any], index: int, conflict_of: int | None = None) -> bytes:
    leaf: dict[str, Any] = {"event": envelope, "index": index}
    if conflict_of is not None:
        leaf["conflict_of"] = conflict_of
    return canonical_json(leaf)


def parse_leaf(data: bytes) -> Leaf:
    """The envelope, index and conflict mark a leaf holds; ValueError if it is not a leaf."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or set(obj) not in (_PLAIN, _MARKED) or not _is_int(obj["index"]):
        raise ValueError("not a ledger leaf: expected an object with 'event', 'index' and optionally 'conflict_of'")
    if not isinstance(obj["event"], dict):
        raise ValueError("not a ledger leaf: 'event' is not an object")
    conflict_of = obj.get("conflict_of")
    if conflict_of is not None and not (_is_int(conflict_of) and 0 <= conflict_of < obj["index"]):
        raise ValueError("not a ledger leaf: 'conflict_of' must name an earlier leaf")
    return Leaf(obj["event"], obj["index"], conflict_of)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
