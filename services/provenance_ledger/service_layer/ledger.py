"""The ledger's use cases: append events as leaves, sign tree heads, answer proofs and receipts,
verify the stored log. No NATS here: the ingest and the API call these."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.provenance_ledger.adapters.keys import load_or_create_key
from services.provenance_ledger.adapters.store import LeafRow, LedgerStore
from services.provenance_ledger.domain.canonical import leaf_bytes, parse_leaf
from services.provenance_ledger.domain.lineage import IndexRow, index_rows, model_key
from services.provenance_ledger.domain.merkle import MerkleTree, ProofError, leaf_hash
from services.provenance_ledger.domain.tree_head import public_pem, sign_head
from services.provenance_ledger.domain.verify import StoredLeaf, verify_log
from shared import errors
from shared.canonical import canonical_json
from shared.events import Event, LedgerCheckpoint, parse_event
from shared.provenance import Receipt, TreeHead, VerifyReport, datetime_to_ms
from shared.signing_keys import short_key_id

log = logging.getLogger(__name__)


def _index_rows_of_leaf(event_type: str, data: bytes, index: int, time_ms: int) -> list[IndexRow]:
    """A logged leaf's index rows, as the ingest derived them (one that cannot be read is skipped, as there)."""
    try:
        return index_rows(parse_event(canonical_json(parse_leaf(data).event)), index, time_ms)
    except Exception:
        log.exception("lineage index failed for leaf %d (%s) while deriving the index from the log", index, event_type)
        return []
DB_FILE = "ledger.sqlite3"


class Incoming(NamedTuple):
    raw: bytes
    event: Event[Any]
    stream_seq: int | None = None


@dataclass
class IngestStats:
    appended: int = 0
    duplicates: int = 0
    conflicts: int = 0
    batches: int = 0


@dataclass
class CheckpointPolicy:
    every_events: int = 1000
    every_seconds: float = 10.0


@dataclass
class Ledger:
    store: LedgerStore
    key: Ed25519PrivateKey
    policy: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    tree: MerkleTree = field(default_factory=MerkleTree)
    stats: IngestStats = field(default_factory=IngestStats)
    tamper: VerifyReport | None = None
    _unsigned: int = 0  # leaves since the last head, not counting our own checkpoint events
    _last_signed: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, directory: Path, policy: CheckpointPolicy | None = None, *, synchronous: str = "FULL") -> Ledger:
        directory.mkdir(parents=True, exist_ok=True)
        key = load_or_create_key(directory)
        ledger = cls(LedgerStore(directory / DB_FILE, synchronous=synchronous), key, policy or CheckpointPolicy())
        if ledger.store.pending_backfill:  # an index table newer than the file: derive it from the leaves
            tables = ", ".join(ledger.store.pending_backfill)
            log.info(
                "ledger index: %d %s rows derived from the log (%s)",
                ledger.store.backfill(_index_rows_of_leaf),
                tables,
                directory,
            )
        ledger.tree.extend(ledger.store.leaf_hashes())
        ledger.stats.conflicts = ledger.store.conflict_count()  # counted in the file: it survives a restart
        # A quick start-up check: stored hashes against every signed head (the full verify re-hashes).
        report = ledger._check_heads()
        ledger.tamper = None if report.ok else report
        latest = ledger.store.latest_head()
        ledger._unsigned = ledger.tree.size - (latest.tree_size if latest else 0)
        return ledger

    def _check_heads(self) -> VerifyReport:
        rows = (StoredLeaf(i, "", b"", self.tree.leaf(i)) for i in range(self.tree.size))
        return verify_log(rows, self.store.heads(), self.key.public_key(), rehash_from=None)

    def close(self) -> None:
        self.store.close()

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def key_id(self) -> str:
        return short_key_id(self.key.public_key())

    @property
    def public_key_pem(self) -> str:
        return public_pem(self.key.public_key())

    # -- ingest ------------------------------------------------------------------------------
    def append_batch(self, batch: Sequence[Incoming]) -> list[int]:
        """Append the events not yet in the log, in order, in one commit; return their indexes.

        An exact copy of a logged event (a redelivery, a re-publish: same id, same content) is
        skipped. An id already logged with *other* content is a leaf of its own, marked with the
        index of the first leaf of that id: the services act on it, so the log must hold it (#19)."""
        if not batch:
            return []
        known = self.store.known_ids([m.event.id for m in batch])
        versions: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # id -> its leaves (index, envelope) so far
        rows: list[LeafRow] = []
        lineage: list[IndexRow] = []
        hashes: list[bytes] = []
        heads: list[TreeHead] = []
        duplicates = conflicts = 0
        index = self.tree.size
        for raw, event, seq in batch:
            envelope = json.loads(raw)
            earlier = versions.get(event.id)
            if earlier is None and event.id in known:
                earlier = versions[event.id] = [
                    (r["idx"], parse_leaf(r["data"]).event) for r in self.store.leaves_with_id(event.id)
                ]
            conflict_of = None
            if earlier:
                if any(logged == envelope for _, logged in earlier):
                    duplicates += 1
                    continue
                conflict_of = earlier[0][0]
                conflicts += 1
                log.warning(
                    "event id %s (%s) arrived again with other content: logged as leaf %d, a conflict with leaf %d",
                    event.id,
                    event.type,
                    index,
                    conflict_of,
                )
            versions.setdefault(event.id, []).append((index, envelope))
            data = leaf_bytes(envelope, index, conflict_of)
            h = leaf_hash(data)
            time_ms = datetime_to_ms(event.time)
            mk = model_key(event.data)
            rows.append(
                LeafRow(
                    index,
                    event.id,
                    event.type,
                    time_ms,
                    event.source.service,
                    mk.name,
                    mk.version,
                    mk.digest,
                    seq,
                    data,
                    h,
                    conflict_of,
                )
            )
            try:
                lineage.extend(index_rows(event, index, time_ms))
            except Exception:  # the leaf matters more than its index entry: never block the log on it
                log.exception("lineage index failed for %s %s", event.type, event.id)
            hashes.append(h)
            if event.type != LedgerCheckpoint.TYPE:
                self._unsigned += 1
            elif event.data.key_id == self.key_id:
                heads.append(_head_from_checkpoint(event.data))
            index += 1
        if rows:
            self.store.append(rows, lineage, heads)
            self.tree.extend(hashes)  # only after the commit: memory never runs ahead of the file
        self.stats.appended += len(rows)
        self.stats.duplicates += duplicates
        self.stats.conflicts += conflicts
        self.stats.batches += 1
        return [r.idx for r in rows]

    # -- signed tree heads -------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        if self._unsigned == 0:
            return False
        return (
            self._unsigned >= self.policy.every_events
            or time.monotonic() - self._last_signed >= self.policy.every_seconds
        )

    def sign(self) -> TreeHead:
        head = sign_head(self.key, self.tree.size, self.tree.root(), time.time_ns() // 1_000_000)
        self.store.add_head(head)
        self._unsigned = 0
        self._last_signed = time.monotonic()
        return head

    def latest_head(self) -> TreeHead | None:
        return self.store.latest_head()

    def head_covering(self, index: int) -> TreeHead:
        """The latest signed head that includes leaf ``index``; signs one now if none does yet."""
        head = self.store.latest_head()
        if head is None or head.tree_size <= index:
            head = self.sign()
        return head

    # -- proofs --------------------------------------------------------------------------------
    def inclusion(self, index: int, tree_size: int | None = None) -> list[bytes]:
        try:
            return self.tree.inclusion_proof(index, tree_size)
        except ProofError as exc:
            raise errors.Invalid(str(exc)) from None

    def consistency(self, first: int, second: int | None = None) -> list[bytes]:
        try:
            return self.tree.consistency_proof(first, second)
        except ProofError as exc:
            raise errors.Invalid(str(exc)) from None

    def root(self, tree_size: int | None = None) -> bytes:
        try:
            return self.tree.root(tree_size)
        except ProofError as exc:
            raise errors.Invalid(str(exc)) from None

    def leaf(self, index: int) -> tuple[dict[str, Any], bytes]:
        # out of range is answered before SQLite sees it: an index beyond int64 would overflow there (a 500)
        row = self.store.leaf(index) if 0 <= index < self.size else None
        if row is None:
            raise errors.NotFound(f"no leaf at index {index} (the log has {self.size})")
        return parse_leaf(row["data"]).event, row["leaf_hash"]

    def index_of(self, event_id: str) -> int:
        row = self.store.leaf_by_event(event_id)
        if row is None:
            raise errors.NotFound(f"event {event_id!r} is not in the ledger")
        return int(row["idx"])

    def receipt(self, request_id: str, *, made_with: str | None = None) -> Receipt:
        """The receipt of a request; with ``made_with`` (an API key id), only if that key made it."""
        rows = self.store.query("SELECT idx FROM inferences WHERE request_id = ?", (request_id,))
        if not rows:
            raise errors.NotFound(f"no inference.completed for request {request_id!r} in the ledger")
        index = int(rows[0]["idx"])
        leaf = parse_leaf(self.store.leaf(index)["data"])
        if made_with is not None and leaf.event.get("data", {}).get("api_key_id") != made_with:
            # the same answer as an unknown request: a key learns nothing of the requests of others
            raise errors.NotFound(
                f"no inference.completed for request {request_id!r} made with this API key ({made_with})"
            )
        head = self.head_covering(index)
        proof = self.tree.inclusion_proof(index, head.tree_size)
        return Receipt(
            event=leaf.event,
            leaf_index=index,
            conflict_of=leaf.conflict_of,
            inclusion_proof=[p.hex() for p in proof],
            tree_head=head,
        )


def _head_from_checkpoint(data: LedgerCheckpoint) -> TreeHead:
    """Our own signed heads come back through the stream as checkpoint events: a ledger rebuilt
    by replaying the stream recovers them (and verify checks them like any other head)."""
    return TreeHead(
        tree_size=data.tree_size,
        root_hash=data.root_hash,
        timestamp_ms=datetime_to_ms(data.signed_at),
        key_id=data.key_id,
        signature=data.signature,
    )


def verify_store(directory: Path, rehash_from: int = 0) -> VerifyReport:
    """Re-hash the stored leaves from ``rehash_from`` (0: every one, the full verify) and check every
    signed head against all stored hashes. Opens its own read-only connection, so it can run in a
    thread beside the ingest, or with no service at all."""
    from services.provenance_ledger.adapters.keys import PUBLIC_FILE
    from services.provenance_ledger.domain.tree_head import load_public_pem

    path = directory / DB_FILE
    if not path.exists():
        raise errors.NotFound(f"no ledger at {path}")
    public_key = load_public_pem((directory / PUBLIC_FILE).read_bytes())
    store = LedgerStore(path, readonly=True)
    try:
        return verify_log(store.stored_leaves(rehash_from), store.heads(), public_key, rehash_from=rehash_from)
    finally:
        store.close()
