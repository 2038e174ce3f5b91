"""Recompute the log from its stored leaves and check it against every signed tree head.

Problems are reported by leaf index:
- ``changed``: the stored bytes no longer hash to the recorded leaf hash;
- ``missing``: an index has no row (a deleted leaf);
- ``reordered``: the row at index i holds the leaf written for index j (leaves carry their index);
- ``malformed``: the stored bytes are not a leaf;
- ``root_mismatch``: the recomputed root at a signed size differs, although every row looks
  self-consistent (someone rewrote bytes and hashes together); the index is the first leaf after
  the last head that still matched, and the detail names the range;
- ``truncated``: a signed head covers more leaves than are stored;
- ``bad_signature``: a stored head's signature does not verify with the ledger key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.provenance_ledger.domain.canonical import parse_leaf
from services.provenance_ledger.domain.merkle import MerkleTree, leaf_hash
from services.provenance_ledger.domain.tree_head import head_signature_problem
from shared.provenance import Problem, ProblemKind, TreeHead, VerifyReport

MAX_PROBLEMS = 1000


class StoredLeaf(NamedTuple):
    index: int
    event_id: str
    data: bytes
    leaf_hash: bytes


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.total = 0

    def add(self, index: int, kind: ProblemKind, detail: str) -> None:
        self.total += 1
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(Problem(index=index, kind=kind, detail=detail))


def verify_log(rows: Iterable[StoredLeaf], heads: Iterable[TreeHead], public_key: Ed25519PublicKey, *,
               rehash_from: int | None = 0) -> VerifyReport:
    """``rows`` in index order. Leaves from index ``rehash_from`` on are re-hashed and re-parsed; the
    ones before it (all of them with None) are taken by their stored hashes, which still go into the
    tree that every signed head is checked against. 0 is the full verify."""
    problems = _Problems()
    tree = MerkleTree()
    expected = 0
    for row in rows:
        if row.index > expected:
            for missing in range(expected, row.index):
                problems.add(missing, "missing", f"no stored leaf at index {missing} (deleted row)")
        expected = row.index + 1
        computed = row.leaf_hash
        if rehash_from is not None and row.index >= rehash_from:
            computed = leaf_hash(row.data)
            if not hmac.compare_digest(computed, row.leaf_hash):
                problems.add(row.index, "changed", "the stored leaf bytes no longer hash to the recorded leaf hash")
            try:
                envelope, leaf_index, _ = parse_leaf(row.data)
            except ValueError as exc:
                problems.add(row.index, "malformed", str(exc))
            else:
                if leaf_index != row.index:
                    problems.add(
                        row.index,
                        "reordered",
                        f"the row at index {row.index} holds the leaf written for index {leaf_index}",
                    )
                elif envelope.get("id") != row.event_id:
                    problems.add(
                        row.index,
                        "changed",
                        f"the event id column says {row.event_id!r}, the leaf says {envelope.get('id')!r}",
                    )
        tree.append(computed)
    heads_checked, last_good = 0, 0
    latest: int | None = None
    for head in sorted(heads, key=lambda h: (h.tree_size, h.timestamp_ms)):
        heads_checked += 1
        latest = head.tree_size
        problem = head_signature_problem(head, public_key)
        if problem:
            problems.add(head.tree_size, "bad_signature", f"tree head at size {head.tree_size}: {problem}")
            continue
        if head.tree_size > tree.size:
            problems.add(
                tree.size, "truncated", f"a signed head covers {head.tree_size} leaves, only {tree.size} are stored"
            )
            continue
        if tree.root(head.tree_size).hex() != head.root_hash:
            problems.add(
                last_good,
                "root_mismatch",
                f"the recomputed root at size {head.tree_size} differs from the signed head: "
                f"a leaf in [{last_good}, {head.tree_size}) was rewritten",
            )
        else:
            last_good = head.tree_size
    return VerifyReport(
        ok=problems.total == 0,
        leaves=tree.size,
        heads_checked=heads_checked,
        latest_signed_size=latest,
        problems=problems.items,
        problems_total=problems.total,
    )
