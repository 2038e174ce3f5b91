"""Provenance-ledger benchmark: sustained ingest with commits, and verifying a 1,000,000-leaf log,
each next to a plain SQLite insert loop measured in the same run on the same disk.

    .venv/bin/python bench/ledger.py            # default: ~1-2 minutes
    .venv/bin/python bench/ledger.py --events 20000 --verify-leaves 200000   # quicker

Rows:
- sqlite baseline: executemany of (id, blob) rows, one commit per batch, WAL, synchronous=FULL;
- ledger append+commit: Ledger.append_batch on already-parsed events (canonical JSON, leaf hash,
  lineage rows, SQLite commit, Merkle append);
- ledger parse+append+commit: the same plus parse_event, as the ingest does per message;
- end to end: events already in JetStream, pulled by the ledger's ingest, committed and acked;
- verify: re-hash and re-parse every stored leaf, rebuild the tree, check the signed head.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.provenance_ledger.api import (  # noqa: E402
    DB_FILE, Incoming, LeafRow, Ledger, MerkleTree, leaf_bytes, leaf_hash, sign_head, verify_store,
)
from shared.events import InferenceCompleted, ModelId, Source, make_event, parse_event  # noqa: E402

BATCH = 1000
MODEL = ModelId(name="tiny", version=1, digest="sha256:" + "a" * 64)
SOURCE = Source(service="inference-worker", node="bench")


def events(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        data = InferenceCompleted(
            request_id=f"r-{i}",
            trace_id=f"{i:032x}",
            model=MODEL,
            deployment_id="dep",
            node_id="bench",
            device="cuda:0",
            prompt_tokens=100,
            completion_tokens=50,
            queue_seconds=0.001,
            time_to_first_token_seconds=0.02,
            time_per_output_token_seconds=0.01,
            e2e_seconds=0.5,
            finish_reason="stop",
            prompt_commitment=hashlib.sha256(b"p%d" % i).hexdigest(),
            output_sha256=hashlib.sha256(b"o%d" % i).hexdigest(),
        )
        out.append(make_event(data, SOURCE).to_bytes())
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} ev/s"


def bench_sqlite_baseline(dirpath: Path, raws: list[bytes]) -> float:
    db = sqlite3.connect(dirpath / "plain.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (idx INTEGER PRIMARY KEY, id TEXT UNIQUE, data BLOB)")
    start = time.perf_counter()
    for b in range(0, len(raws), BATCH):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO t VALUES (?,?,?)", ((b + i, f"id-{b + i}", r) for i, r in enumerate(raws[b : b + BATCH]))
        )
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def bench_ledger(dirpath: Path, raws: list[bytes], parse_inside: bool) -> float:
    ledger = Ledger.open(dirpath)
    pre = None if parse_inside else [Incoming(r, parse_event(r)) for r in raws]
    start = time.perf_counter()
    for b in range(0, len(raws), BATCH):
        chunk = [Incoming(r, parse_event(r)) for r in raws[b : b + BATCH]] if pre is None else pre[b : b + BATCH]
        ledger.append_batch(chunk)
    elapsed = time.perf_counter() - start
    assert ledger.size == len(raws)
    ledger.close()
    return elapsed


async def bench_end_to_end(dirpath: Path, raws: list[bytes]) -> float | str:
    import nats

    from services.provenance_ledger.api import EventIngest
    from shared import bus
    from tests.support.nats import NatsServer

    store_dir = dirpath / "nats"
    store_dir.mkdir(parents=True)
    try:
        server = NatsServer(store_dir).start()
    except Exception as exc:
        return f"skipped: no nats-server ({exc})"
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        for b in range(0, len(raws), 500):  # fill the stream first: this measures the ledger's side
            await asyncio.gather(*(js.publish(InferenceCompleted.subject(), r) for r in raws[b : b + 500]))
        ledger = Ledger.open(dirpath / "ledger")
        ingest = EventIngest(nc, ledger, batch=BATCH)
        start = time.perf_counter()
        await ingest.start()
        while ledger.size < len(raws):
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        await ingest.stop()
        ledger.close()
        await nc.close()
        return elapsed
    finally:
        server.stop()


def build_log(directory: Path, n: int) -> float:
    """A log of n small leaves written straight through the store (fast), with a signed head."""
    ledger = Ledger.open(directory, synchronous="OFF")
    tree = MerkleTree()
    start = time.perf_counter()
    for b in range(0, n, 10_000):
        rows = []
        for i in range(b, min(n, b + 10_000)):
            envelope = {
                "id": f"e{i}",
                "type": "bench.leaf",
                "source": {"service": "bench", "node": "b"},
                "time": "2025-01-01T00:00:00Z",
                "version": 1,
                "data": {"i": i},
            }
            data = leaf_bytes(envelope, i)
            h = leaf_hash(data)
            tree.append(h)
            rows.append(LeafRow(i, f"e{i}", "bench.leaf", 0, "bench", None, None, None, None, data, h))
        ledger.store.append(rows)
    ledger.store.add_head(sign_head(ledger.key, tree.size, tree.root(), int(time.time() * 1000)))
    ledger.close()
    return time.perf_counter() - start


def bench_plain_insert(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE t (idx INTEGER PRIMARY KEY, id TEXT UNIQUE, data BLOB)")
    blob = b"x" * 150
    start = time.perf_counter()
    for b in range(0, n, 10_000):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?,?,?)", ((i, f"e{i}", blob) for i in range(b, min(n, b + 10_000))))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--verify-leaves", type=int, default=1_000_000)
    ap.add_argument("--no-nats", action="store_true")
    args = ap.parse_args()
    print(
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus; "
        f"events {args.events:,}, batch {BATCH}"
    )
    raws = events(args.events)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        t = bench_sqlite_baseline(d, raws)
        rows.append(("sqlite insert loop (baseline, batch commits, FULL)", f"{t:.2f}s", rate(args.events, t)))
        t = bench_ledger(d / "a", raws, parse_inside=False)
        rows.append(("ledger append+commit (parsed events)", f"{t:.2f}s", rate(args.events, t)))
        t = bench_ledger(d / "b", raws, parse_inside=True)
        rows.append(("ledger parse+append+commit", f"{t:.2f}s", rate(args.events, t)))
        if not args.no_nats:
            t2 = asyncio.run(bench_end_to_end(d / "e2e", raws))
            rows.append(
                (
                    "end to end: JetStream -> ingest -> commit -> ack",
                    *((f"{t2:.2f}s", rate(args.events, t2)) if isinstance(t2, float) else ("-", t2)),
                )
            )
        n = args.verify_leaves
        t = bench_plain_insert(d / "plain-big.sqlite3", n)
        rows.append((f"sqlite insert loop, {n:,} rows (baseline)", f"{t:.2f}s", rate(n, t)))
        t = build_log(d / "big", n)
        rows.append((f"build a {n:,}-leaf log (canonical+hash+insert)", f"{t:.2f}s", rate(n, t)))
        start = time.perf_counter()
        report = verify_store(d / "big")
        t = time.perf_counter() - start
        assert report.ok and report.leaves == n, report.problems[:3]
        rows.append((f"verify the {n:,}-leaf log (re-hash, re-parse, 1 head)", f"{t:.2f}s", rate(n, t)))
        start = time.perf_counter()
        ledger = Ledger.open(d / "big")
        t = time.perf_counter() - start
        rows.append((f"open the {n:,}-leaf log (load hashes, check heads)", f"{t:.2f}s", rate(n, t)))
        start = time.perf_counter()
        for i in range(0, n, max(1, n // 1000)):
            ledger.tree.inclusion_proof(i)
        t = time.perf_counter() - start
        rows.append(("inclusion proof at 1M leaves (1000 proofs)", f"{t * 1000 / 1000:.3f} ms each", ""))
        ledger.close()
        assert (d / "big" / DB_FILE).exists()
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'time':>14}  {'rate':>16}")
    print("-" * (width + 34))
    for name, t_, r in rows:
        print(f"{name:<{width}}  {t_:>14}  {r:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
