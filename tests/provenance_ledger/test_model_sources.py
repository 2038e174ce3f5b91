"""Model lineage in the ledger: an import's origin and a conversion's source version, from
model.registered's ``source``, answered in both directions (what a version came from, what was made
from it) over the RPC the CLI uses."""

from __future__ import annotations

import asyncio
import json

import httpx

from cli import main as cli_main
from shared.events import ModelId, ModelRegistered, Source, make_event
from shared.model_source import ModelSource
from tests.provenance_ledger.conftest import publish_all, sha, wait_ingested

IMPORTED = ModelId(name="llama", version=1, digest=sha("manifest llama v1"))
F16 = ModelId(name="llama", version=2, digest=sha("manifest llama v2"))
Q4 = ModelId(name="llama-q4", version=1, digest=sha("manifest llama-q4 v1"))


def registered(model: ModelId, source: ModelSource | None):
    data = ModelRegistered(model=model, architecture="llama", parameters=1000, source=source)
    return make_event(data, Source(service="model-store", node="n"))


def conversion(parent: ModelId, recipe: str) -> ModelSource:
    return ModelSource(kind="conversion", name=parent.name, reference=str(parent.version), derived_from=parent.digest,
                       digests={"model.safetensors": sha("weights")}, recipe=recipe)


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main.main, list(argv))


async def test_a_conversion_chain_is_answered_both_ways_and_an_import_names_its_origin(ledger_service, js, capsys):
    hf = ModelSource(kind="huggingface", name="acme/llama", reference="main", resolved="a" * 40,
                     digests={"model.safetensors": sha("weights"), "config.json": "git-sha1:" + "b" * 40})
    events = [registered(IMPORTED, hf), registered(F16, conversion(IMPORTED, "safetensors -> GGUF F16")),
              registered(Q4, conversion(F16, "GGUF F16 -> Q4_K_M"))]
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, events)
        await wait_ingested(ledger_service, {e.id for e in events})
        assert await cli("lineage", "--model", "llama-q4:1", "--json", "--nats-url", url) == 0
        q4 = json.loads(capsys.readouterr().out)["models"][0]
        assert await cli("lineage", "--model", IMPORTED.digest, "--json", "--nats-url", url) == 0
        root = json.loads(capsys.readouterr().out)["models"][0]
        assert await cli("lineage", "--model", "llama-q4:1", "--nats-url", url) == 0
        table = capsys.readouterr().out
        assert await cli("lineage", "--model", "nosuch", "--nats-url", url) == 1
        missing = capsys.readouterr().err
        assert await cli("lineage", "req-1", "--model", "llama", "--nats-url", url) == 1
        both = capsys.readouterr().err
        assert await cli("ledger", "export", "llama-q4:1", "--format", "cyclonedx", "--nats-url", url) == 0
        bom = json.loads(capsys.readouterr().out)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ledger_service.http), base_url="http://ledger"
        ) as http:
            over_http = await http.get("/lineage/models/llama@nosuch")
            found = await http.get(f"/lineage/models/{F16.digest}")
    assert over_http.status_code == 404 and over_http.json()["error"]["code"] == "not_found"
    assert found.status_code == 200 and [d["digest"] for d in found.json()["models"][0]["derivatives"]] == [Q4.digest]
    assert [(p["name"], p["version"], p["digest"]) for p in q4["derived_from"]] == [
        ("llama", 2, F16.digest),
        ("llama", 1, IMPORTED.digest),
    ]
    assert q4["derived_from"][-1]["source"]["resolved"] == "a" * 40
    assert (
        root["source"]["kind"] == "huggingface" and root["source"]["digests"]["config.json"] == "git-sha1:" + "b" * 40
    )
    assert [d["digest"] for d in root["derivatives"]] == [F16.digest] and root["derived_from"] == []
    assert "from      llama:2" in table and "from      llama:1" in table and "recipe    GGUF F16 -> Q4_K_M" in table
    (ancestor,) = bom["components"][0]["pedigree"]["ancestors"]
    assert (ancestor["name"], ancestor["version"], ancestor["hashes"][0]["content"]) == (
        "llama",
        "2",
        F16.digest.removeprefix("sha256:"),
    )
    assert "not_found" in missing and "give a REQUEST_ID, --dataset DIGEST or --model REF" in both


async def test_a_source_version_missing_from_the_ledger_is_named_as_such(ledger_service, js, capsys):
    orphan = registered(Q4, conversion(F16, "GGUF F16 -> Q4_K_M"))
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, [orphan])
        await wait_ingested(ledger_service, {orphan.id})
        assert await cli("lineage", "--model", "llama-q4", "--json", "--nats-url", url) == 0
        q4 = json.loads(capsys.readouterr().out)["models"][0]
    (parent,) = q4["derived_from"]
    assert (parent["name"], parent["version"], parent["digest"], parent["in_ledger"]) == ("llama", 2, F16.digest, False)
