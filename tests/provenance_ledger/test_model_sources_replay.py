"""The model_sources index is derived from the log: a ledger file that logged model.registered events
with a ``source`` before it had the index (a ledger upgraded after model-store, or one whose index
entry failed) answers their lineage after a restart, as a ledger that indexed them live does."""

from __future__ import annotations

import json
import sqlite3

from services.provenance_ledger.service_layer.ledger import DB_FILE
from shared.events import ModelId
from shared.model_source import ModelSource
from tests.provenance_ledger.conftest import publish_all, sha, wait_ingested
from tests.provenance_ledger.test_model_sources import F16, IMPORTED, Q4, cli, conversion, registered
from tests.support.helpers import make_service

PLAIN = ModelId(name="plain", version=1, digest=sha("manifest plain v1"))


async def test_the_model_sources_index_is_rebuilt_from_the_log_on_restart(
    nats_server, js, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("STRATA_LEDGER_CHECKPOINT_SECONDS", "0.5")
    data = tmp_path / "data"
    hf = ModelSource(
        kind="huggingface",
        name="acme/llama",
        reference="main",
        resolved="a" * 40,
        digests={"model.safetensors": sha("weights")},
    )
    events = [
        registered(IMPORTED, hf),
        registered(F16, conversion(IMPORTED, "safetensors -> GGUF F16")),
        registered(Q4, conversion(F16, "GGUF F16 -> Q4_K_M")),
        registered(PLAIN, None),
    ]
    url = js._nc.connected_url.geturl()
    first = make_service("provenance-ledger", nats_server.url, data)
    async with first.running():
        await publish_all(js, events)
        await wait_ingested(first, {e.id for e in events})
        assert await cli("lineage", "--model", "llama-q4:1", "--json", "--nats-url", url) == 0
        live = json.loads(capsys.readouterr().out)
    db_path = next(data.rglob(DB_FILE))
    db = sqlite3.connect(db_path)
    indexed_live = db.execute("SELECT * FROM model_sources ORDER BY model_digest").fetchall()
    # the file as a ledger from before the index left it: the leaves hold the source, the index does not
    db.execute("DROP TABLE model_sources")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    second = make_service("provenance-ledger", nats_server.url, data)
    async with second.running():
        assert await cli("lineage", "--model", "llama-q4:1", "--json", "--nats-url", url) == 0
        replayed = json.loads(capsys.readouterr().out)
        assert await cli("lineage", "--model", IMPORTED.digest, "--json", "--nats-url", url) == 0
        root = json.loads(capsys.readouterr().out)["models"][0]
    db = sqlite3.connect(db_path)
    indexed_again = db.execute("SELECT * FROM model_sources ORDER BY model_digest").fetchall()
    db.close()
    assert len(indexed_live) == 3 and indexed_again == indexed_live
    assert replayed == live and [p["digest"] for p in replayed["models"][0]["derived_from"]] == [
        F16.digest,
        IMPORTED.digest,
    ]
    assert root["source"]["kind"] == "huggingface" and [d["digest"] for d in root["derivatives"]] == [F16.digest]


async def test_lineage_of_forged_sources_answers_instead_of_failing(ledger_service, js, capsys):
    """model.registered is model-store's, but the ledger logs what the bus carries: a source whose
    reference is a non-ASCII digit, or two versions that each claim to be made from the other, are
    answered (the cycle cut where it closes), not an internal error or an endless walk."""
    a = ModelId(name="a", version=1, digest=sha("manifest a"))
    b = ModelId(name="b", version=1, digest=sha("manifest b"))
    odd = ModelId(name="odd", version=1, digest=sha("manifest odd"))
    events = [
        registered(a, conversion(b, "forged")),
        registered(b, conversion(a, "forged")),
        registered(
            odd, ModelSource(kind="conversion", name="a", reference="\u00b2", derived_from=a.digest, recipe="x")
        ),
    ]
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, events)
        await wait_ingested(ledger_service, {e.id for e in events})
        assert await cli("lineage", "--model", "odd", "--json", "--nats-url", url) == 0
        chain = json.loads(capsys.readouterr().out)["models"][0]["derived_from"]
        assert await cli("lineage", "--model", "a", "--json", "--nats-url", url) == 0
        cycle = json.loads(capsys.readouterr().out)["models"][0]
    assert [p["digest"] for p in chain] == [a.digest, b.digest]
    assert [p["digest"] for p in cycle["derived_from"]] == [b.digest] and [
        d["digest"] for d in cycle["derivatives"]
    ] == [b.digest, odd.digest]


async def test_lineage_prints_a_logged_source_without_its_terminal_escapes(ledger_service, js, capsys):
    """model-store refuses control characters in a source now, but the log holds whatever was published:
    `strata lineage --model` shows them escaped, never sends them to the terminal."""
    forged = ModelId(name="forged", version=1, digest=sha("manifest forged"))
    source = ModelSource(
        kind="huggingface", name="acme/\x1b]8;;http://evil\x07tiny", reference="main\x1b[2J", resolved="a" * 40
    )
    event = registered(forged, source)
    child = registered(
        ModelId(name="child", version=1, digest=sha("manifest child")),
        ModelSource(kind="conversion", name="forged", reference="1", derived_from=forged.digest, recipe="q4\x1b[31m"),
    )
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, [event, child])
        await wait_ingested(ledger_service, {event.id, child.id})
        assert await cli("lineage", "--model", "forged", "--nats-url", url) == 0
        table = capsys.readouterr().out
    assert "\x1b" not in table and "\x07" not in table
    assert "source    huggingface acme/\\x1b]8;;http://evil\\x07tiny main\\x1b[2J" in table and "q4\\x1b[31m" in table


async def test_a_logged_source_that_is_no_address_still_exports(ledger_service, js, capsys):
    """The exports turn an import's source into the address it came from; a logged source whose name is
    no repository id (model-store refuses one now; the log holds what was published) still exports, its
    name percent-encoded, rather than failing the CycloneDX validation for that model forever."""
    odd_hf = ModelId(name="odd-hf", version=1, digest=sha("manifest odd-hf"))
    odd_ollama = ModelId(name="odd-ollama", version=1, digest=sha("manifest odd-ollama"))
    events = [
        registered(odd_hf, ModelSource(kind="huggingface", name="acme/ti ny<x>", reference="ma in", resolved="a" * 40)),
        registered(odd_ollama, ModelSource(kind="ollama", name="no-slash", reference="x y")),
    ]
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, events)
        await wait_ingested(ledger_service, {e.id for e in events})
        boms = []
        for name in ("odd-hf:1", "odd-ollama:1"):
            for fmt in ("cyclonedx", "in-toto"):
                assert await cli("ledger", "export", name, "--format", fmt, "--nats-url", url) == 0, (
                    capsys.readouterr().err
                )
                boms.append(capsys.readouterr().out)
    assert "https://huggingface.co/acme/ti%20ny%3Cx%3E/tree/" + "a" * 40 in boms[0]
    assert "https://huggingface.co/acme/ti%20ny%3Cx%3E/tree/" + "a" * 40 in boms[1]
    assert "manifests/x%20y" in boms[2] and "manifests/x%20y" in boms[3]


async def test_a_source_with_a_field_added_later_is_logged_not_dead_lettered(ledger_service, js, capsys):
    """Events evolve additively (EventData ignores fields it does not know): a model.registered from a
    newer model-store whose source has one more field must still be a leaf of the log, its known
    fields indexed, not dead-lettered, which would leave the registration out of the ledger."""
    newer = ModelId(name="newer", version=1, digest=sha("manifest newer"))
    event = registered(newer, ModelSource(kind="huggingface", name="acme/tiny", reference="main", resolved="a" * 40))
    envelope = json.loads(event.to_bytes())
    envelope["data"]["source"]["license_url"] = "https://example.org/LICENSE"  # a field of a later version
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await js.publish(event.subject, json.dumps(envelope).encode(), headers={"Nats-Msg-Id": event.id})
        await wait_ingested(ledger_service, {event.id}, timeout=10)
        assert await cli("lineage", "--model", "newer", "--json", "--nats-url", url) == 0
        found = json.loads(capsys.readouterr().out)["models"][0]
    assert found["source"]["name"] == "acme/tiny" and found["source"]["resolved"] == "a" * 40
