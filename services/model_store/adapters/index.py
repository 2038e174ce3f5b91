"""The local SQLite index of the catalog: a projection of the KV bucket, never the truth.

It is fed by a KV watch (every key's value at start, then each change), so a replica sees what
another replica wrote, and a deleted or empty file is simply rebuilt at the next start.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from shared.catalog import ResolvedDataset

from services.model_store.adapters.catalog_kv import StoredModel, dec, enc

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS datasets (
    digest TEXT PRIMARY KEY, name TEXT NOT NULL, created TEXT NOT NULL, body TEXT NOT NULL);
"""


class CatalogIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def is_empty(self) -> bool:
        return not any(
            self.db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in ("models", "aliases", "datasets")
        )

    # -- applying KV entries ------------------------------------------------------------------
    def apply(self, key: str, value: dict[str, Any] | None) -> None:
        """One KV entry (value None: deleted). Unknown keys are ignored."""
        kind, _, rest = key.partition(".")
        with self.db:
            if kind == "model":
                name, _, version = rest.rpartition(".")
                if value is None:
                    self.db.execute("DELETE FROM models WHERE name=? AND version=?", (dec(name), int(version)))
                else:
                    stored = StoredModel.model_validate(value)
                    self.put_model(stored, commit=False)
            elif kind == "alias":
                name, _, alias = rest.rpartition(".")
                if value is None:
                    self.db.execute("DELETE FROM aliases WHERE name=? AND alias=?", (dec(name), alias))
                else:
                    self.db.execute(
                        "INSERT OR REPLACE INTO aliases VALUES (?,?,?)", (dec(name), alias, int(value["version"]))
                    )
            elif kind == "dataset":
                if value is None:
                    self.db.execute("DELETE FROM datasets WHERE digest=?", ("sha256:" + rest,))
                else:
                    self.put_dataset(ResolvedDataset.model_validate(value), commit=False)

    def prune(self, live_keys: set[str]) -> None:
        """After a full replay: drop rows whose key no longer exists in KV."""
        with self.db:
            for name, version in self.db.execute("SELECT name, version FROM models").fetchall():
                if f"model.{enc(name)}.{version}" not in live_keys:
                    self.db.execute("DELETE FROM models WHERE name=? AND version=?", (name, version))
            for name, alias in self.db.execute("SELECT name, alias FROM aliases").fetchall():
                if f"alias.{enc(name)}.{alias}" not in live_keys:
                    self.db.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias))
            for (digest,) in self.db.execute("SELECT digest FROM datasets").fetchall():
                if f"dataset.{digest.removeprefix('sha256:')}" not in live_keys:
                    self.db.execute("DELETE FROM datasets WHERE digest=?", (digest,))

    # -- writes from this replica (read-your-writes without waiting for the watch) -------------
    def put_model(self, stored: StoredModel, *, commit: bool = True) -> None:
        row = (stored.model.name, stored.model.version, stored.model.digest, stored.model_dump_json())
        self.db.execute("INSERT OR REPLACE INTO models VALUES (?,?,?,?)", row)
        if commit:
            self.db.commit()

    def delete_model(self, name: str, version: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM models WHERE name=? AND version=?", (name, version))
            self.db.execute("DELETE FROM aliases WHERE name=? AND version=?", (name, version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?)", (name, alias, version))

    def delete_alias(self, name: str, alias: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias))

    def put_dataset(self, stored: ResolvedDataset, *, commit: bool = True) -> None:
        row = (stored.digest, stored.manifest.name, stored.manifest.created.isoformat(), stored.model_dump_json())
        self.db.execute("INSERT OR REPLACE INTO datasets VALUES (?,?,?,?)", row)
        if commit:
            self.db.commit()

    # -- reads --------------------------------------------------------------------------------
    def models(self, name: str | None = None) -> list[StoredModel]:
        sql, args = "SELECT body FROM models", ()
        if name is not None:
            sql, args = sql + " WHERE name=?", (name,)
        rows = self.db.execute(sql + " ORDER BY name, version", args).fetchall()
        return [StoredModel.model_validate_json(body) for (body,) in rows]

    def model(self, name: str, version: int) -> StoredModel | None:
        row = self.db.execute("SELECT body FROM models WHERE name=? AND version=?", (name, version)).fetchone()
        return StoredModel.model_validate_json(row[0]) if row else None

    def latest_version(self, name: str) -> int | None:
        row = self.db.execute("SELECT MAX(version) FROM models WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def alias(self, name: str, alias: str) -> int | None:
        row = self.db.execute("SELECT version FROM aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
        return row[0] if row else None

    def aliases_of(self, name: str, version: int) -> list[str]:
        rows = self.db.execute("SELECT alias FROM aliases WHERE name=? AND version=? ORDER BY alias", (name, version))
        return [a for (a,) in rows.fetchall()]

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self.db.execute("SELECT alias, version FROM aliases WHERE name=?", (name,)).fetchall())

    def datasets(self) -> list[ResolvedDataset]:
        rows = self.db.execute("SELECT body FROM datasets ORDER BY created").fetchall()
        return [ResolvedDataset.model_validate_json(body) for (body,) in rows]

    def dataset(self, digest: str) -> ResolvedDataset | None:
        row = self.db.execute("SELECT body FROM datasets WHERE digest=?", (digest,)).fetchone()
        return ResolvedDataset.model_validate_json(row[0]) if row else None

    def dataset_by_name(self, name: str) -> ResolvedDataset | None:
        row = self.db.execute(
            "SELECT body FROM datasets WHERE name=? ORDER BY created DESC LIMIT 1", (name,)
        ).fetchone()
        return ResolvedDataset.model_validate_json(row[0]) if row else None

    def referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for (body,) in self.db.execute("SELECT body FROM models UNION ALL SELECT body FROM datasets").fetchall():
            refs.update(f["sha256"] for f in json.loads(body)["manifest"]["files"])
        return refs
