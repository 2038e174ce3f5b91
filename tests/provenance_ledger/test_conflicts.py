"""#19 finding 3: an event id reused with other content is acted on by the services, so the ledger
logs it too, as its own leaf marked as a conflict with the first one; exact copies stay skipped,
and the conflict count comes from the file, so it survives a restart."""

from __future__ import annotations

import sqlite3

from services.provenance_ledger.domain.canonical import leaf_bytes, parse_leaf
from services.provenance_ledger.domain.merkle import leaf_hash
from services.provenance_ledger.service_layer.ledger import DB_FILE, Ledger, verify_store
from shared.events import DeployRequested, Source, make_event
from tests.provenance_ledger.conftest import NODE, ledger_of, wait_ingested

CLIENT = Source(service="client", node=NODE)


def rows_with_id(service, event_id: str) -> list[dict]:
    return ledger_of(service).store.query("SELECT idx, data FROM leaves WHERE event_id = ? ORDER BY idx", (event_id,))


async def test_an_event_id_reused_with_other_content_is_its_own_leaf_marked_as_a_conflict(ledger_service, js):
    first = make_event(DeployRequested(deployment_id="dep-1", model_ref="tiny:1"), CLIENT)
    reused = make_event(DeployRequested(deployment_id="dep-2", model_ref="tiny:1"), CLIENT, event_id=first.id)
    after = make_event(DeployRequested(deployment_id="dep-3", model_ref="tiny:1"), CLIENT)
    async with ledger_service.running():
        await js.publish(first.subject, first.to_bytes(), headers={"Nats-Msg-Id": first.id})
        # Past JetStream's 2-minute duplicate window the same Msg-Id is stored again: another Msg-Id
        # stands for that here. The second copy of `reused` is an exact duplicate: skipped.
        for attempt in ("later", "again"):
            await js.publish(reused.subject, reused.to_bytes(), headers={"Nats-Msg-Id": f"{first.id}-{attempt}"})
        await js.publish(after.subject, after.to_bytes(), headers={"Nats-Msg-Id": after.id})
        await wait_ingested(ledger_service, {after.id})
        ledger = ledger_of(ledger_service)
        rows = rows_with_id(ledger_service, first.id)
        assert len(rows) == 2, "the reused id with other content must be a leaf of its own"
        (first_event, first_index, first_mark), (second_event, second_index, second_mark) = (
            parse_leaf(r["data"]) for r in rows
        )
        assert first_event["data"]["deployment_id"] == "dep-1" and first_mark is None
        assert second_event["data"]["deployment_id"] == "dep-2" and second_mark == first_index
        assert ledger.stats.conflicts == 1 and ledger.stats.duplicates == 1
        assert ledger.index_of(first.id) == first_index  # lookups by id answer the first leaf
        assert ledger.store.conflict_count() == 1
        directory = ledger_service.settings.service_dir
    reopened = Ledger.open(directory)
    try:
        assert reopened.stats.conflicts == 1, "the conflict count comes from the file"
    finally:
        reopened.close()
    assert verify_store(directory).ok


def test_the_conflict_mark_is_inside_the_hashed_leaf(tmp_path):
    event = make_event(DeployRequested(deployment_id="dep-1", model_ref="tiny:1"), CLIENT).model_dump(mode="json")
    plain, marked = leaf_bytes(event, 5), leaf_bytes(event, 5, conflict_of=2)
    assert leaf_hash(plain) != leaf_hash(marked)
    assert parse_leaf(plain) == (event, 5, None) and parse_leaf(marked) == (event, 5, 2)


# The leaves table as the ledger made it before #19: event_id UNIQUE, no conflict column.
V1_LEAVES = """CREATE TABLE leaves (idx INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
time_ms INTEGER NOT NULL, source_service TEXT NOT NULL, model_name TEXT, model_version INTEGER, model_digest TEXT,
stream_seq INTEGER, data BLOB NOT NULL, leaf_hash BLOB NOT NULL)"""


def test_a_ledger_file_from_before_conflict_leaves_opens_keeps_its_leaves_and_takes_a_conflict(tmp_path):
    from services.provenance_ledger.service_layer.ledger import Incoming

    directory = tmp_path / "provenance-ledger"
    directory.mkdir()
    old = [make_event(DeployRequested(deployment_id=f"dep-{i}", model_ref="tiny:1"), CLIENT) for i in range(3)]
    db = sqlite3.connect(directory / DB_FILE)
    db.execute(V1_LEAVES)
    for i, e in enumerate(old):
        data = leaf_bytes(e.model_dump(mode="json"), i)
        db.execute(
            "INSERT INTO leaves VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (i, e.id, e.type, 0, "client", None, None, None, i + 1, data, leaf_hash(data)),
        )
    db.commit()
    db.close()
    ledger = Ledger.open(directory)
    try:
        assert ledger.size == 3 and ledger.tamper is None
        reused = make_event(DeployRequested(deployment_id="dep-x", model_ref="tiny:1"), CLIENT, event_id=old[1].id)
        assert ledger.append_batch([Incoming(reused.to_bytes(), reused, 9)]) == [3]
        assert ledger.stats.conflicts == 1 and ledger.index_of(old[1].id) == 1
        ledger.sign()
    finally:
        ledger.close()
    assert verify_store(directory).ok


def test_a_conflict_mark_that_names_no_earlier_leaf_is_not_a_leaf():
    event = make_event(DeployRequested(deployment_id="dep-1", model_ref="tiny:1"), CLIENT).model_dump(mode="json")
    for bad in (5, 6, -1, True):
        data = leaf_bytes(event, 5, conflict_of=bad)
        try:
            parse_leaf(data)
        except ValueError as exc:
            assert "conflict_of" in str(exc)
        else:
            raise AssertionError(f"conflict_of={bad!r} at index 5 was accepted")
