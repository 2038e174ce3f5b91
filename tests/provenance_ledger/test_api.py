"""Receipts, proofs, lineage, audit and exports through the running ledger: real nats-server,
real uvicorn for HTTP, NATS RPC, and the `strata` CLI."""

from __future__ import annotations

import asyncio
import copy
import json
from contextlib import asynccontextmanager

import httpx
import pytest

from cli import main as cli_main
from services.provenance_ledger.domain import exports
from services.provenance_ledger.domain.merkle import verify_consistency, verify_inclusion
from services.provenance_ledger.domain.receipt import ReceiptInvalid, verify_receipt
from shared import errors, rpc, subjects
from shared.provenance import Empty, Receipt, RequestRef
from tests.provenance_ledger.conftest import (
    DATASET,
    MODEL,
    OTHER_DATASET,
    TRAINING_RECORD,
    leaf_index_of,
    publish_all,
    scripted_events,
    wait_ingested,
)
from tests.support.live import serve_on_loop


@asynccontextmanager
async def serving(service):
    """The ledger under a real uvicorn (its lifespan runs the service), yielding an HTTP client."""
    async with serve_on_loop(service.http, lifespan="on") as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main.main, list(argv))


def mutations(obj, path=()):
    """Every way to change one leaf value of a JSON document: (path, new value)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from mutations(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from mutations(v, (*path, i))
        if obj:
            yield path, obj[:-1]
    elif isinstance(obj, bool):
        yield path, not obj
    elif isinstance(obj, (int, float)):
        yield path, obj + 1
    elif isinstance(obj, str):
        yield path, obj[:-1] + ("0" if obj[-1:] != "0" else "1")
    else:
        yield path, "x"


def changed(doc, path, value):
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


async def test_a_receipt_verifies_offline_and_fails_when_any_field_of_it_is_changed(
    ledger_service, js, tmp_path, capsys
):
    run = scripted_events(20)
    url = js._nc.connected_url.geturl()
    async with serving(ledger_service) as http:
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        pem = (await http.get("/public-key")).text
        assert (await cli("receipt", "req-7", "--nats-url", url)) == 0
        receipt_json = capsys.readouterr().out
        assert (await cli("ledger", "public-key", "--nats-url", url)) == 0
        assert capsys.readouterr().out == pem
    receipt_file, key_file = tmp_path / "receipt.json", tmp_path / "ledger.pub"
    receipt_file.write_text(receipt_json)
    key_file.write_text(pem)
    # offline: the service and NATS are gone, only the file and the key remain
    assert cli_main.main(["receipt", "verify", str(receipt_file), "--key", str(key_file)]) == 0
    assert "OK: request req-7" in capsys.readouterr().out
    receipt = json.loads(receipt_json)
    assert receipt["event"]["data"]["request_id"] == "req-7" and receipt["event"]["type"] == "inference.completed"
    check = verify_receipt(receipt, pem)
    assert check.ok and check.leaf_index == receipt["leaf_index"]
    tried = 0
    for path, value in mutations(receipt):
        with pytest.raises(ReceiptInvalid):
            verify_receipt(changed(receipt, path, value), pem)
        tried += 1
    assert tried > 30  # every field of event, index, proof and head
    (tmp_path / "bad.json").write_text(json.dumps(changed(receipt, ("event", "data", "completion_tokens"), 999)))
    assert cli_main.main(["receipt", "verify", str(tmp_path / "bad.json"), "--key", str(key_file)]) == 2
    assert "INVALID" in capsys.readouterr().out
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.provenance_ledger.domain.tree_head import public_pem

    with pytest.raises(ReceiptInvalid, match="not by this ledger key"):
        verify_receipt(receipt, public_pem(Ed25519PrivateKey.generate().public_key()))


async def test_proofs_heads_and_typed_errors_over_http_and_rpc(ledger_service, js):
    run = scripted_events(10)
    async with serving(ledger_service) as http:
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        signed = (await http.post("/checkpoint")).json()
        head = (await http.get("/head")).json()
        assert head["signed"]["tree_size"] == signed["tree_size"] <= head["tree_size"]
        size = signed["tree_size"]
        for index in (0, 3, size - 1):
            p = (await http.get("/proof/inclusion", params={"index": index, "tree_size": size})).json()
            assert verify_inclusion(
                bytes.fromhex(p["leaf_hash"]),
                index,
                size,
                [bytes.fromhex(x) for x in p["proof"]],
                bytes.fromhex(signed["root_hash"]),
            )
            assert p["tree_head"]["signature"] == signed["signature"]
        by_id = (await http.get("/proof/inclusion", params={"event_id": run.events[4].id})).json()
        assert by_id["leaf_index"] == leaf_index_of(ledger_service, run.events[4].id) and by_id["tree_head"] is not None
        c = (await http.get("/proof/consistency", params={"first": 5, "second": size})).json()
        assert verify_consistency(
            5,
            size,
            bytes.fromhex(c["first_root"]),
            bytes.fromhex(signed["root_hash"]),
            [bytes.fromhex(x) for x in c["proof"]],
        )
        third = leaf_index_of(ledger_service, run.events[2].id)
        assert (await http.get(f"/leaves/{third}")).json()["event"]["id"] == run.events[2].id
        assert "/receipts/{request_id}" in (await http.get("/openapi.json")).json()["paths"]
        for url, params, status in [
            ("/proof/inclusion", {"index": 10_000}, 404),
            ("/proof/inclusion", {}, 400),
            ("/proof/inclusion", {"index": 1, "event_id": "x"}, 400),
            ("/proof/inclusion", {"event_id": "nope"}, 404),
            ("/proof/consistency", {"first": 10_000}, 400),
            ("/receipts/nope", {}, 404),
            ("/leaves/99999", {}, 404),
            ("/lineage/requests/nope", {}, 404),
            ("/lineage/datasets/nope", {}, 404),
            ("/exports/nope", {}, 404),
            ("/audit", {"since": "yesterday-ish"}, 400),
            ("/exports/tiny", {"format": "spdx"}, 422),
        ]:
            r = await http.get(url, params=params)
            assert r.status_code == status, (url, params, r.text)
        nc = js._nc
        key = await rpc.call(nc, subjects.rpc("provenance-ledger", "public_key"), Empty(), dict)
        assert key["pem"].startswith("-----BEGIN PUBLIC KEY-----")
        with pytest.raises(errors.NotFound, match="no inference.completed for request 'nope'"):
            await rpc.call(nc, subjects.rpc("provenance-ledger", "receipt"), RequestRef(request_id="nope"), Receipt)
        reply = rpc.RpcReply.model_validate_json(
            (await nc.request(subjects.rpc("provenance-ledger", "inclusion"), b'{"index": -1}', timeout=5)).data
        )
        assert not reply.ok and reply.error.code == "invalid"


async def test_lineage_answers_both_directions_and_audit_lists_a_models_events(ledger_service, js, capsys):
    run = scripted_events(20)
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        assert await cli("lineage", "req-3", "--json", "--nats-url", url) == 0
        lineage = json.loads(capsys.readouterr().out)
        assert await cli("lineage", "req-3", "--nats-url", url) == 0
        table = capsys.readouterr().out
        assert await cli("lineage", "--dataset", DATASET, "--json", "--nats-url", url) == 0
        by_dataset = json.loads(capsys.readouterr().out)
        assert await cli("lineage", "--dataset", "sha256:unknown", "--nats-url", url) == 1
        assert "not_found" in capsys.readouterr().err
        assert await cli("audit", "--since", "1h", "--model", "tiny", "--json", "--nats-url", url) == 0
        audit = json.loads(capsys.readouterr().out)
        assert (
            await cli("audit", "--since", "1h", "--model", "tiny:1", "--type", "inference.completed", "--nats-url", url)
            == 0
        )
        audit_table = capsys.readouterr().out
        assert await cli("audit", "--since", "2999-01-01", "--model", MODEL.digest, "--json", "--nats-url", url) == 0
        assert json.loads(capsys.readouterr().out) == []
    m = lineage["model"]
    assert (m["name"], m["version"], m["digest"], m["training_record"]) == ("tiny", 1, MODEL.digest, TRAINING_RECORD)
    assert {d["digest"] for d in m["datasets"]} == {DATASET, OTHER_DATASET} and all(
        d["in_ledger"] for d in m["datasets"]
    )
    assert [e["type"] for e in lineage["deployment"]["events"]] == [
        "deploy.scheduled",
        "deploy.loading",
        "deploy.ready",
    ]
    assert (
        lineage["node"]["hostname"] == "gpu-box"
        and lineage["device"]["name"] == "NVIDIA H100"
        and lineage["device"]["uuid"] == "GPU-1234"
    )
    assert lineage["inference"]["request_id"] == "req-3"
    assert "tiny:1" in table and "NVIDIA H100" in table and "tiny-shakespeare" in table
    assert [mm["digest"] for mm in by_dataset["models"]] == [MODEL.digest]
    assert sorted(i["request_id"] for i in by_dataset["models"][0]["inferences"]) == sorted(run.request_ids())
    types = [a["type"] for a in audit]
    assert types.count("inference.completed") == 20
    assert {"model.registered", "deploy.requested", "deploy.scheduled", "deploy.ready"} <= set(types)
    assert "node.registered" not in types and "dataset.registered" not in types
    assert "20 event(s)" in audit_table


async def test_exports_validate_against_their_schemas(ledger_service, js, capsys):
    run = scripted_events(1)
    url = js._nc.connected_url.geturl()
    async with ledger_service.running():
        await publish_all(js, run.events)
        await wait_ingested(ledger_service, run.ids)
        assert await cli("ledger", "export", "tiny:1", "--format", "in-toto", "--nats-url", url) == 0
        statement = json.loads(capsys.readouterr().out)
        assert await cli("ledger", "export", MODEL.digest, "--format", "cyclonedx", "--nats-url", url) == 0
        bom = json.loads(capsys.readouterr().out)
        assert await cli("ledger", "export", "nope", "--nats-url", url) == 1
    exports.validate_in_toto(statement)
    assert (
        statement["_type"] == "https://in-toto.io/Statement/v1"
        and statement["predicateType"] == "https://slsa.dev/provenance/v1"
    )
    assert statement["subject"][0]["digest"] == {"sha256": MODEL.digest.split(":")[1]}
    materials = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {m["digest"]["sha256"] for m in materials} == {DATASET.split(":")[1], OTHER_DATASET.split(":")[1]}
    assert TRAINING_RECORD in statement["predicate"]["runDetails"]["builder"]["id"]
    exports.validate_cyclonedx(bom)
    model = bom["components"][0]
    assert model["type"] == "machine-learning-model" and model["modelCard"]["modelParameters"]["datasets"]
    assert {c["type"] for c in bom["components"][1:]} == {"data"}
    # the validators are not a formality: a broken document is refused
    with pytest.raises(exports.ExportInvalid):
        exports.validate_cyclonedx({**bom, "components": [{**model, "type": "ai-thing"}]})
    with pytest.raises(exports.ExportInvalid):
        exports.validate_in_toto(
            {**statement, "predicate": {"buildDefinition": {}, "runDetails": {"builder": {"id": "x"}}}}
        )
    with pytest.raises(exports.ExportInvalid):
        exports.validate_in_toto({k: v for k, v in statement.items() if k != "subject"})
