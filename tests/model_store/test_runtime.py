"""Push records which runtime serves a model (shared/architectures.py): an architecture nothing serves is
stored, with runtime null and a warning naming what is supported; manifests from before the field
still resolve, verify and deduplicate."""

from __future__ import annotations

import hashlib
import json

import httpx
import nats

from cli.main import main
from services.model_store.service_layer.handlers import ModelStore
from shared import rpc, subjects
from shared.architectures import ENGINE, supported
from shared.catalog import (
    CATALOG_BUCKET,
    ModelManifest,
    PushedModel,
    PushModelRequest,
    ResolvedModel,
    ResolveRequest,
    canonical_json,
)
from shared.model_fetch import fetch_model
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import eventually, make_service

NOPE = {"architectures": ["NopeForCausalLM"], "model_type": "nope"}
WARNING = f"no runtime serves NopeForCausalLM; supported: {supported()}"


def http(service) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store")


async def push(client, directory, name: str) -> httpx.Response:
    files = await upload_dir(client, directory)
    return await client.post("/v1/models", json=PushModelRequest(name=name, files=files).model_dump(mode="json"))


async def test_a_push_nothing_can_serve_is_stored_with_runtime_null_and_a_warning(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        served = await push(client, make_checkpoint(tmp_path / "llama", seed=1), "llama")
        unserved = await push(client, make_checkpoint(tmp_path / "nope", seed=2, config=NOPE), "nope")
        assert (served.status_code, unserved.status_code) == (201, 201), unserved.text
        assert served.json()["manifest"]["metadata"]["runtime"] == ENGINE and served.json()["warnings"] == []
        body = unserved.json()
        assert "runtime" in body["manifest"]["metadata"] and body["manifest"]["metadata"]["runtime"] is None
        assert body["warnings"] == [WARNING]
        # stored like any model: it resolves, runtime null in the signed manifest
        nc = await nats.connect(nats_server.url)
        try:
            resolved = await rpc.call(
                nc, subjects.rpc("model-store", "resolve"), ResolveRequest(ref="nope"), ResolvedModel
            )
        finally:
            await nc.close()
        assert (
            resolved.manifest.metadata.architecture == "NopeForCausalLM" and resolved.manifest.metadata.runtime is None
        )
        assert resolved.model.digest == body["model"]["digest"]


def test_strata_model_push_warns_on_stderr_and_stores_it(live_store, tmp_path, capsys):
    url = ("--url", live_store.url)
    code = main(["model", "push", str(make_checkpoint(tmp_path / "nope", config=NOPE)), "--name", "nope", *url])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("registered nope:1 sha256:"), err
    assert f"warning: {WARNING}" in err
    assert main(["model", "push", str(make_checkpoint(tmp_path / "llama")), "--name", "llama", *url]) == 0
    assert "warning" not in capsys.readouterr().err


async def test_a_manifest_from_before_the_runtime_field_resolves_verifies_and_deduplicates(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        source = make_checkpoint(tmp_path / "src", seed=1)
        assert (await push(client, source, "tiny")).status_code == 201
        nc = await nats.connect(nats_server.url)
        try:
            # rewrite version 1 as a model-store before the field wrote it: no "runtime" key, digest and signature
            # over that
            kv = await nc.jetstream().key_value(CATALOG_BUCKET)
            stored = json.loads((await kv.get("model.tiny.1")).value)
            del stored["manifest"]["metadata"]["runtime"]
            old_digest = "sha256:" + hashlib.sha256(canonical_json(stored["manifest"])).hexdigest()
            stored["model"]["digest"] = old_digest
            stored["signature"] = service.part(ModelStore).signer.sign(ModelManifest.model_validate(stored["manifest"]))
            await kv.put("model.tiny.1", json.dumps(stored).encode())
            await eventually(
                lambda: service.part(ModelStore).index.model("tiny", 1).model.digest == old_digest,
                what="index follows KV",
            )

            resolved = await rpc.call(
                nc, subjects.rpc("model-store", "resolve"), ResolveRequest(ref="tiny:1"), ResolvedModel
            )
            assert resolved.model.digest == old_digest and resolved.manifest.metadata.runtime is None
            assert "runtime" not in json.loads(resolved.model_dump_json())["manifest"]["metadata"]
            local = await fetch_model(nc, "tiny:1", tmp_path / "cache")  # digest and signature still verify
            assert (local.path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        finally:
            await nc.close()
        again = await push(client, source, "tiny")  # the same files: the old version, not a new one
        assert again.status_code == 200, again.text
        pushed = PushedModel.model_validate(again.json())
        assert (pushed.created, pushed.model.version, pushed.model.digest, pushed.warnings) == (
            False,
            1,
            old_digest,
            [],
        )
