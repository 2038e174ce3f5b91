"""Tampering with the stored log is reported by leaf index; a SIGKILLed ledger loses nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from cli import main as cli_main
from cli.natsd import free_port
from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from services.provenance_ledger.service_layer.ledger import DB_FILE, Ledger, verify_store
from shared import bus, subjects
from shared.events import InferenceCompleted, ModelId, Source, make_event
from tests.provenance_ledger.conftest import publish_all, scripted_events, wait_ingested
from tests.support.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def signed_ledger(ledger_service, js, tmp_path) -> Path:
    """A stopped ledger's directory: a scripted run, logged and covered by a signed head."""
    run = scripted_events(12)
    async with ledger_service.running():
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        await ledger_service.part(LedgerApp).checkpoint()
    return ledger_service.settings.service_dir


def tampered_copy(src: Path, dst: Path, *sql: tuple[str, tuple]) -> Path:
    shutil.copytree(src, dst)
    db = sqlite3.connect(dst / DB_FILE)
    with db:
        for statement, params in sql:
            db.execute(statement, params)
    db.close()
    return dst


def problems_at(report) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for p in report.problems:
        found.setdefault(p.index, set()).add(p.kind)
    return found


def test_an_untouched_log_verifies(signed_ledger, capsys):
    report = verify_store(signed_ledger)
    assert report.ok and report.leaves >= 20 and report.heads_checked >= 1
    assert cli_main.main(["ledger", "verify", "--data-dir", str(signed_ledger.parent)]) == 0
    assert "OK" in capsys.readouterr().out


def test_a_one_byte_change_to_a_stored_leaf_is_reported_at_its_index(signed_ledger, tmp_path, capsys):
    data = bytearray(
        sqlite3.connect(signed_ledger / DB_FILE).execute("SELECT data FROM leaves WHERE idx = 10").fetchone()[0]
    )
    at = data.index(b'"completion_tokens":') + len(b'"completion_tokens":')
    data[at] ^= 0x01  # "2" -> "3": still valid JSON, a different answer
    bad = tampered_copy(
        signed_ledger,
        tmp_path / "one-byte" / "provenance-ledger",
        ("UPDATE leaves SET data = ? WHERE idx = 10", (bytes(data),)),
    )
    report = verify_store(bad)
    assert not report.ok
    assert problems_at(report)[10] == {"changed"}
    assert cli_main.main(["ledger", "verify", "--data-dir", str(bad.parent)]) == 2
    assert "leaf 10: changed" in capsys.readouterr().out


def test_a_deleted_leaf_is_reported_at_its_index(signed_ledger, tmp_path):
    bad = tampered_copy(
        signed_ledger, tmp_path / "deleted" / "provenance-ledger", ("DELETE FROM leaves WHERE idx = 7", ())
    )
    report = verify_store(bad)
    assert not report.ok and "missing" in problems_at(report)[7]


def test_deleting_the_newest_leaves_is_reported_as_truncation_at_the_first_gone(signed_ledger, tmp_path):
    ledger = Ledger.open(signed_ledger)
    signed = ledger.store.latest_head().tree_size
    ledger.close()
    bad = tampered_copy(
        signed_ledger,
        tmp_path / "truncated" / "provenance-ledger",
        ("DELETE FROM leaves WHERE idx >= ?", (signed - 2,)),
    )
    report = verify_store(bad)
    assert not report.ok and "truncated" in problems_at(report)[signed - 2]


def test_a_swapped_pair_of_rows_is_reported_at_both_indexes(signed_ledger, tmp_path):
    cols = (
        "event_id, type, time_ms, source_service, model_name, model_version, model_digest, stream_seq, data, leaf_hash"
    )
    swap = [
        ("CREATE TEMP TABLE pair AS SELECT idx, " + cols + " FROM leaves WHERE idx IN (3, 4)", ()),
        ("UPDATE leaves SET event_id = 'tmp-' || event_id WHERE idx IN (3, 4)", ()),
        *[
            (f"UPDATE leaves SET ({cols}) = (SELECT {cols} FROM pair WHERE pair.idx = ?) WHERE idx = ?", (src, dst))
            for src, dst in ((4, 3), (3, 4))
        ],
    ]
    bad = tampered_copy(signed_ledger, tmp_path / "swapped" / "provenance-ledger", *swap)
    report = verify_store(bad)
    found = problems_at(report)
    assert not report.ok and "reordered" in found[3] and "reordered" in found[4]
    assert any(p.kind == "root_mismatch" for p in report.problems)  # and the signed head no longer matches


def test_rewriting_bytes_and_hash_together_still_breaks_the_signed_root(signed_ledger, tmp_path):
    from services.provenance_ledger.domain.canonical import leaf_bytes, parse_leaf
    from services.provenance_ledger.domain.merkle import leaf_hash

    db = sqlite3.connect(signed_ledger / DB_FILE)
    event, index, _ = parse_leaf(db.execute("SELECT data FROM leaves WHERE idx = 9").fetchone()[0])
    db.close()
    event["data"]["completion_tokens"] = 1
    forged = leaf_bytes(event, index)
    bad = tampered_copy(
        signed_ledger,
        tmp_path / "forged" / "provenance-ledger",
        ("UPDATE leaves SET data = ?, leaf_hash = ? WHERE idx = 9", (forged, leaf_hash(forged))),
    )
    report = verify_store(bad)
    assert not report.ok and {p.kind for p in report.problems} == {"root_mismatch"}
    assert report.problems[0].index <= 9


async def test_killing_the_ledger_mid_ingest_and_restarting_it_loses_nothing(nats_server, tmp_path):
    total = 3000
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "STRATA_NATS_URL": nats_server.url,
        "STRATA_DATA_DIR": str(data_dir),
        "STRATA_NODE_ID": "node-k",
        "STRATA_PROVENANCE_LEDGER_PORT": str(free_port()),
        "STRATA_LEDGER_CHECKPOINT_SECONDS": "0.3",
        "STRATA_LOG_LEVEL": "INFO",
    }

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "cli.main", "serve", "provenance-ledger"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "ledger.log", "ab"),
        )

    def logged() -> int:
        db = data_dir / "provenance-ledger" / DB_FILE
        if not db.exists():
            return 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return con.execute("SELECT count(*) FROM leaves WHERE type != 'ledger.checkpoint'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            con.close()

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    model = ModelId(name="tiny", version=1, digest="sha256:" + "a" * 64)
    events = [
        make_event(
            InferenceCompleted(
                request_id=f"k-{i}",
                model=model,
                deployment_id="d",
                node_id="n",
                device="cpu",
                prompt_tokens=1,
                completion_tokens=1,
                queue_seconds=0,
                time_to_first_token_seconds=0,
                time_per_output_token_seconds=0,
                e2e_seconds=0,
                finish_reason="stop",
                prompt_commitment="0" * 64,
                output_sha256="1" * 64,
            ),
            Source(service="inference-worker", node="n"),
        )
        for i in range(total)
    ]
    proc = start()
    try:
        publisher = asyncio.create_task(publish_all(js, events))
        await eventually(lambda: logged() >= total // 5, 60, "the ledger ingesting")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        at_kill = logged()
        await publisher
        assert 0 < at_kill < total, f"the kill should land mid-ingest (logged {at_kill} of {total})"
        proc = start()
        await eventually(lambda: logged() >= total, 60, f"all {total} events logged after the restart")
        await asyncio.sleep(1.0)  # let redeliveries (unacked before the kill) arrive: they must not be appended
        assert logged() == total
        con = sqlite3.connect(f"file:{data_dir / 'provenance-ledger' / DB_FILE}?mode=ro", uri=True)
        ids = {r[0] for r in con.execute("SELECT event_id FROM leaves WHERE type = 'inference.completed'")}
        con.close()
        assert ids == {e.id for e in events}
        stream = await js.stream_info(subjects.EVENTS_STREAM)
        assert stream.state.messages >= total
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
            proc.wait(timeout=10)
            raise AssertionError(
                "the ledger did not stop within 15s of SIGTERM:\n" + (tmp_path / "ledger.log").read_text()[-4000:]
            ) from None
        finally:
            await nc.close()
    report = verify_store(data_dir / "provenance-ledger")
    assert report.ok, report.problems
