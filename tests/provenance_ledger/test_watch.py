"""#19 finding 5: the ledger checks its own file without being asked, at start (in the background)
and then periodically; what it finds is published once as ledger.tamper_detected, and the monitor
raises its ledger_tamper alert on it."""

from __future__ import annotations

import sqlite3

import pytest

from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from services.monitor.entrypoints.app import create_monitor
from services.provenance_ledger.service_layer.ledger import DB_FILE
from services.provenance_ledger.config import LedgerConfig, WatchSettings
from shared import subjects
from shared.events import AlertFiring, TamperDetected, parse_event
from tests.monitor.conftest import fast_config
from tests.provenance_ledger.conftest import ledger_of, publish_all, scripted_events, wait_ingested
from tests.provenance_ledger.test_tamper_and_crash import signed_ledger  # noqa: F401  (a fixture)
from tests.support.helpers import eventually, make_service, settings_for


def flip_a_byte(db_file, index: int) -> None:
    """Change one digit of a stored leaf in place, leaving its recorded hash alone."""
    db = sqlite3.connect(db_file)
    with db:
        data = bytearray(db.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()[0])
        at = data.index(b'"completion_tokens":') + len(b'"completion_tokens":')
        data[at] ^= 0x01
        db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data), index))
    db.close()


async def collect(nc, subject: str) -> list:
    seen: list = []

    async def got(msg) -> None:
        seen.append(parse_event(msg.data, msg.subject).data)

    await nc.subscribe(subject, cb=got)
    return seen


async def test_a_leaf_altered_while_the_ledger_was_down_is_published_at_the_next_start_and_alerts(
        signed_ledger, nats_server, js, tmp_path):  # noqa: F811
    flip_a_byte(signed_ledger / DB_FILE, 10)
    nc = js._nc
    tamper = await collect(nc, subjects.event(TamperDetected.TYPE))
    alerts = await collect(nc, subjects.event(AlertFiring.TYPE))
    monitor = create_monitor(settings_for("monitor", nats_server.url, tmp_path / "monitor"), fast_config())
    ledger = make_service("provenance-ledger", nats_server.url, signed_ledger.parent)
    async with monitor.running(), ledger.running():  # no POST /verify, no RPC verify: only the start
        await eventually(lambda: any(t.index == 10 and t.reason.startswith("changed") for t in tamper), 20,
                         "ledger.tamper_detected for leaf 10")
        await eventually(
            lambda: any(a.rule == "ledger_tamper" for a in alerts), 20, "the monitor's ledger_tamper alert"
        )
        await eventually(lambda: "ledger-verify" not in ledger.catching_up, 20, "the start-up verify to finish")
        assert ledger.part(LedgerApp).stats().tamper_suspected
    assert len([t for t in tamper if t.index == 10]) == 1


async def test_the_periodic_check_rehashes_new_leaves_reports_each_finding_once_and_keeps_a_marker(
    ledger_service, js, monkeypatch
):
    monkeypatch.setenv("STRATA_LEDGER_VERIFY_SECONDS", "0.2")
    tamper = await collect(js._nc, subjects.event(TamperDetected.TYPE))
    first, second = scripted_events(5), scripted_events(5)
    async with ledger_service.running():
        lg = ledger_of(ledger_service)
        await publish_all(js, first.events)
        await wait_ingested(ledger_service, first.ids)
        size = lg.size
        await eventually(lambda: (lg.store.verified_size() or 0) >= size, 20, "a clean pass recorded as the marker")
        assert ledger_service.part(LedgerApp).stats().verified_size >= size
        await publish_all(js, second.events)
        await wait_ingested(ledger_service, second.ids)
        new = next(
            r["idx"]
            for r in lg.store.query(
                "SELECT idx FROM leaves WHERE type = 'inference.completed' ORDER BY idx DESC LIMIT 1"
            )
        )
        flip_a_byte(ledger_service.settings.service_dir / DB_FILE, new)
        await eventually(lambda: any(t.index == new for t in tamper), 20, f"ledger.tamper_detected for leaf {new}")
        passes = ledger_service.part(LedgerApp).watch.passes
        await eventually(
            lambda: ledger_service.part(LedgerApp).watch.passes >= passes + 3, 20, "three more periodic passes"
        )
    assert len([t for t in tamper if t.index == new]) == 1, "one event per finding, not one per period"


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_verify_interval_is_refused_with_its_name(monkeypatch, value):
    monkeypatch.setenv("STRATA_LEDGER_VERIFY_SECONDS", value)
    with pytest.raises(ValueError, match="STRATA_LEDGER_VERIFY_SECONDS"):
        WatchSettings.from_env()


@pytest.mark.parametrize(
    "name, value",
    [("STRATA_LEDGER_CHECKPOINT_SECONDS", "0"), ("STRATA_LEDGER_CHECKPOINT_SECONDS", "soon"),
     ("STRATA_LEDGER_CHECKPOINT_EVENTS", "1.5"), ("STRATA_LEDGER_CHECKPOINT_EVENTS", "0"),
     ("STRATA_LEDGER_ACK_WAIT_SECONDS", "-3")],
)
def test_a_bad_checkpoint_or_ack_wait_setting_is_refused_with_its_name(name, value):
    with pytest.raises(ValueError, match=name):
        LedgerConfig.from_env({name: value})


def test_the_ledger_settings_read_from_the_environment():
    config = LedgerConfig.from_env({"STRATA_LEDGER_CHECKPOINT_EVENTS": "7", "STRATA_LEDGER_CHECKPOINT_SECONDS": "0.5",
                                    "STRATA_LEDGER_ACK_WAIT_SECONDS": "3", "STRATA_LEDGER_VERIFY_SECONDS": "60"})
    assert (config.checkpoint.every_events, config.checkpoint.every_seconds, config.ack_wait_s) == (7, 0.5, 3.0)
    assert config.watch.every_s == 60.0 and LedgerConfig.from_env({}).checkpoint.every_events == 1000
