"""Lineage, audit and export queries over the ledger's index (all read-only)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from services.provenance_ledger.adapters.store import LedgerStore
from services.provenance_ledger.domain.canonical import parse_leaf
from services.provenance_ledger.domain.exports import DatasetFacts, ModelFacts
from services.provenance_ledger.domain.lineage import ref_name
from shared import errors
from shared.provenance import datetime_to_ms, ms_to_datetime

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> int:
    """``2025-01-31``, ``2025-01-31T12:00:00Z`` or a relative ``90s``/``15m``/``2h``/``7d``/``1w`` -> ms."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        delta = timedelta(**{_UNITS[match[2]]: int(match[1])})
        return datetime_to_ms((now or datetime.now(timezone.utc)) - delta)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.Invalid(
            f"--since {text!r}: expected an ISO time (2025-01-31T12:00Z) or an age like 15m, 2h, 7d"
        ) from None
    return datetime_to_ms(when if when.tzinfo else when.replace(tzinfo=timezone.utc))


def _iso(ms: int | None) -> str | None:
    return ms_to_datetime(ms).isoformat().replace("+00:00", "Z") if ms is not None else None


def _event(store: LedgerStore, idx: int) -> dict[str, Any]:
    row = store.leaf(idx)
    return parse_leaf(row["data"]).event if row else {}


def resolve_model(store: LedgerStore, ref: str) -> list[dict[str, Any]]:
    """Model versions a ref names: a digest (``sha256:...`` or 64 hex), ``NAME``, ``NAME:VERSION``
    or ``NAME@ALIAS`` (the alias as the ledger last saw it set)."""
    if ":" in ref and not re.match(r"^[^:]+:\d+$", ref) or re.fullmatch(r"[0-9a-f]{64}", ref):
        return store.query("SELECT * FROM models WHERE digest = ?", (ref,))
    if "@" in ref:
        name, alias = ref.split("@", 1)
        aliases = store.query(
            "SELECT data FROM leaves WHERE type = 'model.aliased' AND model_name = ? ORDER BY idx DESC", (name,)
        )
        for row in aliases:
            data = parse_leaf(row["data"]).event["data"]
            if data.get("alias") == alias:
                return store.query("SELECT * FROM models WHERE digest = ?", (data["model"]["digest"],))
        return []
    if ":" in ref:
        name, version = ref.split(":", 1)
        return store.query("SELECT * FROM models WHERE name = ? AND version = ?", (name, int(version)))
    return store.query("SELECT * FROM models WHERE name = ? ORDER BY version", (ref,))


def _datasets(store: LedgerStore, model_digest: str) -> list[dict[str, Any]]:
    out = []
    for link in store.query(
        "SELECT dataset_digest FROM model_datasets WHERE model_digest = ? ORDER BY dataset_digest", (model_digest,)
    ):
        rows = store.query("SELECT * FROM datasets WHERE digest = ?", (link["dataset_digest"],))
        d = rows[0] if rows else {"digest": link["dataset_digest"]}
        out.append(
            {
                "digest": d["digest"],
                "name": d.get("name"),
                "source": d.get("source"),
                "license": d.get("license"),
                "files": d.get("files"),
                "leaf_index": d.get("idx"),
                "in_ledger": bool(rows),
            }
        )
    return out


def _model_view(store: LedgerStore, digest: str, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = store.query("SELECT * FROM models WHERE digest = ?", (digest,))
    if not rows:
        return {**(fallback or {}), "digest": digest, "in_ledger": False, "datasets": [], "source": None}
    m = rows[0]
    return {
        "name": m["name"],
        "version": m["version"],
        "digest": m["digest"],
        "architecture": m["architecture"],
        "parameters": m["parameters"],
        "training_record": m["training_record"],
        "license": m["license"],
        "registered_at": _iso(m["time_ms"]),
        "leaf_index": m["idx"],
        "in_ledger": True,
        "datasets": _datasets(store, digest),
        "source": _source(store, digest),
    }


def _source(store: LedgerStore, model_digest: str) -> dict[str, Any] | None:
    rows = store.query("SELECT * FROM model_sources WHERE model_digest = ?", (model_digest,))
    if not rows:
        return None
    s = rows[0]
    return {
        "kind": s["kind"],
        "name": s["name"],
        "reference": s["reference"],
        "resolved": s["resolved"],
        "derived_from": s["derived_from"],
        "digests": json.loads(s["digests"] or "{}"),
        "recipe": s["recipe"],
    }


MAX_DERIVATION_DEPTH = 32


def model_lineage(store: LedgerStore, ref: str) -> dict[str, Any]:
    """A model version's origin and derivations: where it came from (an import's source, or the chain of
    versions it was converted from, oldest last) and which versions were converted from it."""
    versions = resolve_model(store, ref)
    if not versions:
        raise errors.NotFound(f"no model.registered for {ref!r} in the ledger")
    out = []
    for m in versions:
        view = _model_view(store, m["digest"])
        chain, seen, step = [], {m["digest"]}, view["source"]
        while step and step.get("derived_from") and len(chain) < MAX_DERIVATION_DEPTH:
            parent = step["derived_from"]
            if parent in seen:
                break
            seen.add(parent)
            version = (
                int(step["reference"]) if step["reference"].isascii() and step["reference"].isdigit() else None
            )  # '²'.isdigit()
            chain.append(_model_view(store, parent, {"name": step["name"], "version": version}))
            step = chain[-1].get("source")
        view["derived_from"] = chain
        view["derivatives"] = [
            {**_model_view(store, d["model_digest"]), "recipe": d["recipe"]}
            for d in store.query(
                "SELECT model_digest, recipe FROM model_sources WHERE derived_from = ? ORDER BY model_digest",
                (m["digest"],),
            )
        ]
        out.append(view)
    return {"ref": ref, "models": out}


def request_lineage(store: LedgerStore, request_id: str) -> dict[str, Any]:
    """Answer -> model version and manifest digest -> datasets and training record -> deployment,
    node and device."""
    rows = store.query("SELECT * FROM inferences WHERE request_id = ?", (request_id,))
    if not rows:
        raise errors.NotFound(f"no inference.completed for request {request_id!r} in the ledger")
    inf = rows[0]
    event = _event(store, inf["idx"])
    deploy_events = store.query(
        "SELECT * FROM deployments WHERE deployment_id = ? ORDER BY idx", (inf["deployment_id"],)
    )
    nodes = store.query(
        "SELECT * FROM nodes WHERE node_id = ? AND idx <= ? ORDER BY idx DESC LIMIT 1", (inf["node_id"], inf["idx"])
    )
    devices = json.loads(nodes[0]["devices"]) if nodes else []
    device = next((d for d in devices if d.get("id") == inf["device"]), None)
    return {
        "request_id": request_id,
        "inference": {
            "leaf_index": inf["idx"],
            "event_id": inf["event_id"],
            "time": _iso(inf["time_ms"]),
            **event.get("data", {}),
        },
        "model": _model_view(store, inf["model_digest"], {"name": inf["model_name"], "version": inf["model_version"]}),
        "deployment": {
            "deployment_id": inf["deployment_id"],
            "events": [
                {
                    "type": d["event_type"],
                    "leaf_index": d["idx"],
                    "time": _iso(d["time_ms"]),
                    "node_id": d["node_id"],
                    "device": d["device"],
                }
                for d in deploy_events
            ],
        },
        "node": {
            "node_id": inf["node_id"],
            "hostname": nodes[0]["hostname"] if nodes else None,
            "registered_leaf_index": nodes[0]["idx"] if nodes else None,
        },
        "device": {"id": inf["device"], **(device or {})},
    }


def dataset_lineage(store: LedgerStore, digest: str, limit: int = 10_000) -> dict[str, Any]:
    """The data-takedown question: which models were trained on this dataset, which answers they gave."""
    ds = store.query("SELECT * FROM datasets WHERE digest = ?", (digest,))
    links = store.query(
        "SELECT model_digest FROM model_datasets WHERE dataset_digest = ? ORDER BY model_digest", (digest,)
    )
    if not ds and not links:
        raise errors.NotFound(f"dataset {digest!r} is not in the ledger")
    models = []
    for link in links:
        view = _model_view(store, link["model_digest"])
        infs = store.query(
            "SELECT request_id, idx, time_ms, deployment_id, node_id, device FROM inferences "
            "WHERE model_digest = ? ORDER BY idx LIMIT ?",
            (link["model_digest"], limit),
        )
        view["inferences"] = [
            {
                "request_id": i["request_id"],
                "leaf_index": i["idx"],
                "time": _iso(i["time_ms"]),
                "deployment_id": i["deployment_id"],
                "node_id": i["node_id"],
                "device": i["device"],
            }
            for i in infs
        ]
        models.append(view)
    d = ds[0] if ds else None
    return {
        "dataset": {
            "digest": digest,
            "name": d and d["name"],
            "source": d and d["source"],
            "license": d and d["license"],
            "leaf_index": d and d["idx"],
            "in_ledger": bool(d),
        },
        "models": models,
        "inferences_total": sum(len(m["inferences"]) for m in models),
    }


def audit(
    store: LedgerStore,
    *,
    since_ms: int | None = None,
    model: str | None = None,
    event_type: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    where, params = [], []
    if since_ms is not None:
        where.append("time_ms >= ?")
        params.append(since_ms)
    if event_type:
        where.append("type = ?")
        params.append(event_type)
    if model:
        versions = resolve_model(store, model)
        digests = [v["digest"] for v in versions]
        if ":" in model and not versions and not re.match(r"^[^:]+:\d+$", model):
            digests = [model]  # a digest the ledger has no model.registered for: still search by it
        clause = [f"model_digest IN ({','.join('?' * len(digests))})"] if digests else []
        params.extend(digests)
        if "@" not in model and (":" not in model or re.match(r"^[^:]+:\d+$", model)):
            name = ref_name(model)
            version = int(model.split(":", 1)[1]) if ":" in model else None
            clause.append("(model_name = ? AND (model_version IS NULL OR ? IS NULL OR model_version = ?))")
            params.extend([name, version, version])
        where.append(f"({' OR '.join(clause) or '0'})")
    sql = "SELECT idx, event_id, type, time_ms, source_service, data FROM leaves"
    sql += f" WHERE {' AND '.join(where)}" if where else ""
    sql += " ORDER BY idx LIMIT ?"
    rows = store.query(sql, (*params, limit))
    return [
        {
            "leaf_index": r["idx"],
            "event_id": r["event_id"],
            "type": r["type"],
            "time": _iso(r["time_ms"]),
            "source": r["source_service"],
            "data": parse_leaf(r["data"]).event.get("data", {}),
        }
        for r in rows
    ]


def model_facts(store: LedgerStore, ref: str, tree_head: dict[str, Any] | None) -> ModelFacts:
    versions = resolve_model(store, ref)
    if not versions:
        raise errors.NotFound(f"no model.registered for {ref!r} in the ledger")
    m = versions[-1]  # NAME alone: the newest version
    leaf = store.leaf(m["idx"])
    return ModelFacts(
        name=m["name"],
        version=m["version"],
        digest=m["digest"],
        architecture=m["architecture"],
        parameters=m["parameters"],
        training_record=m["training_record"],
        license=m["license"],
        registered_at=_iso(m["time_ms"]),
        leaf_index=m["idx"],
        leaf_hash=leaf["leaf_hash"].hex(),
        tree_head=tree_head,
        source=_source(store, m["digest"]),
        datasets=[
            DatasetFacts(
                digest=d["digest"], name=d["name"], source=d["source"], license=d["license"], leaf_index=d["leaf_index"]
            )
            for d in _datasets(store, m["digest"])
        ],
    )
