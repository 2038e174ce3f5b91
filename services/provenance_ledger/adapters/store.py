"""The ledger's SQLite file (WAL mode): leaves, signed tree heads and the lineage index.

One writer (the ingest) appends a batch of leaves and their index rows in one transaction; readers
(queries, proofs, verify) may use their own connections. ``synchronous=FULL`` makes a commit
durable against power loss too, since the ingest acknowledges events only after it.

Schema version 2 (``PRAGMA user_version``, #19): ``leaves.event_id`` is no longer UNIQUE, since an id
reused with other content is a leaf of its own (``conflict_of`` names the first leaf with that id). A
file of version 1 is migrated when it is opened: its leaves are copied into the new table unchanged.

Schema version 3 (#17): the ``model_sources`` index. It is derived from the log, so a file of an earlier
version (whose ledger may have logged model.registered events with a ``source`` it did not index) is
marked ``pending_backfill``; the ledger re-derives the rows from those leaves (``backfill``), and only
then is the file marked version 3, so a crash midway redoes it at the next start.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from services.provenance_ledger.domain.lineage import IndexRow
from services.provenance_ledger.domain.verify import StoredLeaf
from shared.provenance import TreeHead

LEAVES_TABLE = """
CREATE TABLE IF NOT EXISTS leaves (
    idx INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    source_service TEXT NOT NULL,
    model_name TEXT,
    model_version INTEGER,
    model_digest TEXT,
    stream_seq INTEGER,
    data BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    conflict_of INTEGER
)"""
SCHEMA = LEAVES_TABLE + """;
CREATE INDEX IF NOT EXISTS leaves_event_id ON leaves(event_id);
CREATE INDEX IF NOT EXISTS leaves_conflicts ON leaves(conflict_of) WHERE conflict_of IS NOT NULL;
CREATE INDEX IF NOT EXISTS leaves_time ON leaves(time_ms);
CREATE INDEX IF NOT EXISTS leaves_model_name ON leaves(model_name, time_ms);
CREATE INDEX IF NOT EXISTS leaves_model_digest ON leaves(model_digest, time_ms);
CREATE TABLE IF NOT EXISTS tree_heads (
    tree_size INTEGER NOT NULL,
    root_hash TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (tree_size, timestamp_ms)
);
CREATE TABLE IF NOT EXISTS verified (
    id INTEGER PRIMARY KEY CHECK (id = 1), size INTEGER NOT NULL, at_ms INTEGER NOT NULL, full_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS inferences (
    request_id TEXT PRIMARY KEY, idx INTEGER NOT NULL, event_id TEXT NOT NULL, time_ms INTEGER NOT NULL,
    model_name TEXT, model_version INTEGER, model_digest TEXT, deployment_id TEXT, node_id TEXT, device TEXT
);
CREATE INDEX IF NOT EXISTS inferences_model ON inferences(model_digest);
CREATE TABLE IF NOT EXISTS models (
    digest TEXT PRIMARY KEY, idx INTEGER NOT NULL, event_id TEXT NOT NULL, time_ms INTEGER NOT NULL,
    name TEXT, version INTEGER, architecture TEXT, parameters INTEGER, training_record TEXT, license TEXT
);
CREATE TABLE IF NOT EXISTS model_datasets (
    model_digest TEXT NOT NULL, dataset_digest TEXT NOT NULL, PRIMARY KEY (model_digest, dataset_digest)
);
CREATE INDEX IF NOT EXISTS model_datasets_dataset ON model_datasets(dataset_digest);
CREATE TABLE IF NOT EXISTS model_sources (
    model_digest TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, reference TEXT NOT NULL, resolved TEXT,
    derived_from TEXT, digests TEXT, recipe TEXT
);
CREATE INDEX IF NOT EXISTS model_sources_derived_from ON model_sources(derived_from);
CREATE TABLE IF NOT EXISTS datasets (
    digest TEXT PRIMARY KEY, idx INTEGER NOT NULL, event_id TEXT NOT NULL, time_ms INTEGER NOT NULL,
    name TEXT, source TEXT, license TEXT, files INTEGER
);
CREATE TABLE IF NOT EXISTS deployments (
    deployment_id TEXT NOT NULL, event_type TEXT NOT NULL, idx INTEGER NOT NULL, event_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL, model_digest TEXT, node_id TEXT, device TEXT,
    PRIMARY KEY (deployment_id, idx)
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT NOT NULL, idx INTEGER NOT NULL, event_id TEXT NOT NULL, time_ms INTEGER NOT NULL,
    hostname TEXT, devices TEXT, PRIMARY KEY (node_id, idx)
);
"""

_INDEX_SQL: dict[str, tuple[str, tuple[str, ...]]] = {}


def _insert(table: str, columns: tuple[str, ...], verb: str = "INSERT OR IGNORE") -> None:
    _INDEX_SQL[table] = (
        f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        columns,
    )


_insert(
    "inferences",
    (
        "request_id",
        "idx",
        "event_id",
        "time_ms",
        "model_name",
        "model_version",
        "model_digest",
        "deployment_id",
        "node_id",
        "device",
    ),
)
_insert(
    "models",
    (
        "digest",
        "idx",
        "event_id",
        "time_ms",
        "name",
        "version",
        "architecture",
        "parameters",
        "training_record",
        "license",
    ),
)
_insert("model_datasets", ("model_digest", "dataset_digest"))
_insert("model_sources", ("model_digest", "kind", "name", "reference", "resolved", "derived_from", "digests", "recipe"))
_insert("datasets", ("digest", "idx", "event_id", "time_ms", "name", "source", "license", "files"))
_insert(
    "deployments", ("deployment_id", "event_type", "idx", "event_id", "time_ms", "model_digest", "node_id", "device")
)
_insert("nodes", ("node_id", "idx", "event_id", "time_ms", "hostname", "devices"))


class LeafRow(NamedTuple):
    idx: int
    event_id: str
    type: str
    time_ms: int
    source_service: str
    model_name: str | None
    model_version: int | None
    model_digest: str | None
    stream_seq: int | None
    data: bytes
    leaf_hash: bytes
    conflict_of: int | None = None


SCHEMA_VERSION = 3
BACKFILL = {"model_sources": "model.registered"}  # index tables added after v2 -> the leaf type they derive from
_V1_COLUMNS = (
    "idx, event_id, type, time_ms, source_service, model_name, model_version, model_digest, stream_seq, data, leaf_hash"
)


class LedgerStore:
    def __init__(self, path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> None:
        self.path = path
        self.pending_backfill: dict[str, str] = {}  # index table -> leaf type, to re-derive from the log (backfill)
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            before = self.db.execute("PRAGMA user_version").fetchone()[0]
            had_leaves = self._has_leaves()
            self._migrate()
            self.db.executescript(SCHEMA)
            if had_leaves and before < SCHEMA_VERSION:
                self.pending_backfill = dict(BACKFILL)  # user_version is set by backfill_done
            else:
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.db.row_factory = sqlite3.Row

    def _has_leaves(self) -> bool:
        return (
            self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leaves'").fetchone()
            is not None
        )

    def backfill(self, rows_of: Callable[[str, bytes, int, int], Iterable[IndexRow]]) -> int:
        """Re-derive the ``pending_backfill`` index tables from their leaves (``rows_of(type, data, idx, time_ms)``),
        in one transaction that also marks the file as this schema version. Returns the rows written."""
        tables = self.pending_backfill
        if not tables:
            return 0
        db, written = self.db, 0
        types = sorted(set(tables.values()))
        db.execute("BEGIN IMMEDIATE")
        try:
            sql = (
                f"SELECT type, data, idx, time_ms FROM leaves WHERE type IN ({','.join('?' * len(types))}) ORDER BY idx"
            )
            for leaf in db.execute(sql, types).fetchall():
                for row in rows_of(leaf[0], leaf[1], leaf[2], leaf[3]):
                    if row.table in tables:
                        insert, columns = _INDEX_SQL[row.table]
                        db.execute(insert, [_sql_value(row.values.get(c)) for c in columns])
                        written += 1
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.pending_backfill = {}
        return written

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        """Version 1 -> 2: rebuild ``leaves`` without UNIQUE(event_id) (SQLite cannot drop a constraint)."""
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_leaves = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leaves'").fetchone()
        if version >= SCHEMA_VERSION or not has_leaves:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("ALTER TABLE leaves RENAME TO leaves_v1")  # its indexes go with it, and are made anew by SCHEMA
            db.execute(LEAVES_TABLE)
            db.execute(f"INSERT INTO leaves ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM leaves_v1")
            db.execute("DROP TABLE leaves_v1")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writes ------------------------------------------------------------------------------
    def append(
        self, leaves: list[LeafRow], index_rows: Iterable[IndexRow] = (), heads: Iterable[TreeHead] = ()
    ) -> None:
        """Append a batch of leaves and their lineage rows atomically (all or nothing)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO leaves VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", leaves)
            by_table: dict[str, list[list[Any]]] = {}
            for row in index_rows:
                columns = _INDEX_SQL[row.table][1]
                by_table.setdefault(row.table, []).append([_sql_value(row.values.get(c)) for c in columns])
            for table, params in by_table.items():
                db.executemany(_INDEX_SQL[table][0], params)
            for head in heads:
                self.add_head(head)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def add_head(self, head: TreeHead) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO tree_heads VALUES (?,?,?,?,?)",
            (head.tree_size, head.root_hash, head.timestamp_ms, head.key_id, head.signature),
        )

    def set_verified(self, size: int, at_ms: int, *, full: bool) -> None:
        self.db.execute(
            "INSERT INTO verified (id, size, at_ms, full_at_ms) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "size = excluded.size, at_ms = excluded.at_ms, "
            "full_at_ms = coalesce(excluded.full_at_ms, verified.full_at_ms)",
            (size, at_ms, at_ms if full else None),
        )

    # -- reads -------------------------------------------------------------------------------
    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM leaves").fetchone()[0]

    def known_ids(self, event_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(event_ids), 500):
            chunk = event_ids[i : i + 500]
            sql = f"SELECT event_id FROM leaves WHERE event_id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(sql, chunk))
        return found

    def leaves_with_id(self, event_id: str) -> list[sqlite3.Row]:
        """Every leaf of an event id, first first: one, or more when the id was reused with other content."""
        return self.db.execute("SELECT * FROM leaves WHERE event_id = ? ORDER BY idx", (event_id,)).fetchall()

    def conflict_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM leaves WHERE conflict_of IS NOT NULL").fetchone()[0]

    def leaf_hashes(self) -> Iterator[bytes]:
        for (h,) in self.db.execute("SELECT leaf_hash FROM leaves ORDER BY idx"):
            yield h

    def stored_leaves(self, bytes_from: int = 0) -> Iterator[StoredLeaf]:
        """Every leaf in index order; the bytes only from index ``bytes_from`` on (empty before it)."""
        sql = "SELECT idx, event_id, CASE WHEN idx >= ? THEN data ELSE x'' END, leaf_hash FROM leaves ORDER BY idx"
        for row in self.db.execute(sql, (bytes_from,)):
            yield StoredLeaf(row[0], row[1], row[2], row[3])

    def verified(self) -> sqlite3.Row | None:
        """The marker of the last clean verify: ``size`` leaves re-hashed and matching, ``at_ms``, and
        ``full_at_ms``, the last pass that re-hashed every leaf."""
        return self.db.execute("SELECT size, at_ms, full_at_ms FROM verified WHERE id = 1").fetchone()

    def verified_size(self) -> int | None:
        row = self.verified()
        return int(row["size"]) if row else None

    def leaf(self, idx: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM leaves WHERE idx = ?", (idx,)).fetchone()

    def leaf_by_event(self, event_id: str) -> sqlite3.Row | None:
        """The first leaf with this id (a later one reusing it is marked ``conflict_of``)."""
        return self.db.execute("SELECT * FROM leaves WHERE event_id = ? ORDER BY idx LIMIT 1", (event_id,)).fetchone()

    def heads(self) -> list[TreeHead]:
        rows = self.db.execute("SELECT * FROM tree_heads ORDER BY tree_size, timestamp_ms").fetchall()
        return [TreeHead(**dict(r)) for r in rows]

    def latest_head(self) -> TreeHead | None:
        row = self.db.execute("SELECT * FROM tree_heads ORDER BY tree_size DESC, timestamp_ms DESC LIMIT 1").fetchone()
        return TreeHead(**dict(row)) if row else None

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(sql, tuple(params))]


def _sql_value(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
