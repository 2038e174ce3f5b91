"""The built-in model is registered, with its corpus as lineage and alias prod, at first start only."""

from __future__ import annotations

import json

import httpx

from services.model_store.service_layer.handlers import ModelStore
from services.model_store.service_layer import builtin
from tests.model_store.conftest import make_checkpoint
from tests.support.helpers import eventually, make_service


def fake_builtin(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "kjv.txt").write_text("In the beginning God created the heaven and the earth.\n")
    (corpus / "LICENSE").write_text("public domain\n")
    record = {"format": "strata.builtin.training_record/1", "model_name": "strata-builtin-kjv", "seed": 0}
    model = make_checkpoint(tmp_path / "model", seed=7, extra={"training_record.json": json.dumps(record)})
    monkeypatch.setattr(builtin, "CORPUS_DIR", corpus)
    monkeypatch.setattr(builtin, "MODEL_DIR", model)
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "1")
    return record


async def test_first_start_registers_the_builtin_model_with_its_lineage(nats_server, tmp_path, monkeypatch):
    record = fake_builtin(tmp_path, monkeypatch)
    data = tmp_path / "data"
    service = make_service("model-store", nats_server.url, data)
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://s") as client,
    ):
        await eventually(
            lambda: service.part(ModelStore).index.alias("strata-builtin-kjv", "prod") == 1,
            what="built-in model aliased prod",
        )
        model = (await client.get("/v1/models/strata-builtin-kjv@prod")).json()
        datasets = (await client.get("/v1/datasets")).json()["datasets"]
        assert [d["manifest"]["name"] for d in datasets] == ["kjv-corpus"]
        assert model["manifest"]["datasets"] == [datasets[0]["digest"]]
        assert model["manifest"]["training_record"] == record
        assert {f["path"] for f in model["manifest"]["files"]} == {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "training_record.json",
        }
        # the user deletes it: a restart does not bring it back (only a first start registers it)
        await client.delete("/v1/models/strata-builtin-kjv@prod")
    service = make_service("model-store", nats_server.url, data)
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://s") as client,
    ):
        assert await builtin.register_builtin(service.part(ModelStore)) is None
        assert (await client.get("/v1/models")).json() == {"models": []}


async def test_no_checkpoint_yet_registers_nothing(nats_server, tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "MODEL_DIR", tmp_path / "absent")
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running():
        assert await builtin.register_builtin(service.part(ModelStore)) is None
        assert service.part(ModelStore).index.models() == []


async def test_a_broken_builtin_checkpoint_is_not_registered_and_is_retried_next_start(
    nats_server, tmp_path, monkeypatch
):
    fake_builtin(tmp_path, monkeypatch)
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")  # this test drives the registration itself
    (builtin.MODEL_DIR / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running():
        store = service.part(ModelStore)
        assert await builtin.register_builtin(store) is None  # refused: logged, nothing registered
        assert store.index.models() == []
        make_checkpoint(builtin.MODEL_DIR, seed=1)  # fixed: the next start registers it
        assert (await builtin.register_builtin(store)).model.name == "strata-builtin-kjv"
