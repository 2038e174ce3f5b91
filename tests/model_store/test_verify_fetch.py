"""The fetch helper and verification: tampering with a blob or a manifest is caught before use."""

from __future__ import annotations

import json

import httpx
import nats
import pytest

from services.model_store.service_layer.handlers import ModelStore
from shared import rpc, subjects
from shared.catalog import (
    BLOB_BUCKET, ModelManifest, PublicKey, PublicKeyRequest, PushModelRequest, ResolvedModel, manifest_digest,
)
from shared.events import parse_event
from services.model_store.domain.signing import Signer
from shared.model_fetch import VerificationError, fetch_model, verify_manifest
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import eventually, make_service


async def pushed(client, directory, name="tiny", **extra) -> ResolvedModel:
    files = await upload_dir(client, directory)
    r = await client.post("/v1/models", json=PushModelRequest(name=name, files=files, **extra).model_dump(mode="json"))
    assert r.status_code == 201, r.text
    return ResolvedModel.model_validate(r.json())


def http(service) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store")


async def test_fetch_verifies_caches_and_materialises_the_checkpoint(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        source = make_checkpoint(tmp_path / "src", seed=1)
        model = await pushed(client, source)
        nc = await nats.connect(nats_server.url)
        try:
            local = await fetch_model(nc, "tiny:1", tmp_path / "cache")
            assert local.resolved.model == model.model
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                assert (local.path / name).read_bytes() == (source / name).read_bytes()
            blobs = sorted(p.name for p in (tmp_path / "cache" / "blobs").iterdir())
            assert blobs == sorted(f.sha256 for f in model.manifest.files)
            # a second fetch reuses the cached blobs: it works with the Object Store emptied
            store = await nc.jetstream().object_store(BLOB_BUCKET)
            for f in model.manifest.files:
                await store.delete(f.sha256)
            again = await fetch_model(nc, model, tmp_path / "cache")
            assert (again.path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        finally:
            await nc.close()


async def test_flipped_byte_in_a_stored_blob_is_caught_by_fetch_and_verify(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        model = await pushed(client, make_checkpoint(tmp_path / "src", seed=1))
        weights = next(f for f in model.manifest.files if f.path == "model.safetensors")
        nc = await nats.connect(nats_server.url)
        try:
            store = await nc.jetstream().object_store(BLOB_BUCKET)
            data = bytearray((await store.get(weights.sha256)).data)
            data[-1] ^= 0x01
            await store.put(weights.sha256, bytes(data))  # someone with write access rewrote the blob
            with pytest.raises(VerificationError, match="model.safetensors: content from the store hashes to"):
                await fetch_model(nc, "tiny", tmp_path / "cache")
            assert not (tmp_path / "cache" / "blobs" / weights.sha256).exists()
            assert not (tmp_path / "cache" / "models").exists()
        finally:
            await nc.close()


async def test_changed_manifest_is_caught_before_any_blob_is_fetched(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        model = await pushed(client, make_checkpoint(tmp_path / "src", seed=1), license="apache-2.0")
        nc = await nats.connect(nats_server.url)
        try:
            key = await rpc.call(nc, subjects.rpc("model-store", "public_key"), PublicKeyRequest(), PublicKey)
            verify_manifest(model, key)
            # 1. the manifest changed but the digest kept: the digest no longer matches
            changed = model.model_copy(
                update={"manifest": model.manifest.model_copy(update={"license": "proprietary"})}
            )
            with pytest.raises(VerificationError, match="the manifest's digest is .* it was changed"):
                await fetch_model(nc, changed, tmp_path / "cache")
            # 2. the manifest and its digest changed together: the signature no longer covers it
            rewritten = changed.model_copy(
                update={"model": changed.model.model_copy(update={"digest": manifest_digest(changed.manifest)})}
            )
            with pytest.raises(VerificationError, match="differs from the one that was signed"):
                await fetch_model(nc, rewritten, tmp_path / "cache")
            # 3. the same, rewritten in the KV catalog itself, as a resolver would serve it
            kv = await nc.jetstream().key_value("strata-catalog")
            stored = json.loads((await kv.get("model.tiny.1")).value)
            stored["manifest"]["files"][0]["sha256"] = "0" * 64
            stored["model"]["digest"] = manifest_digest(ModelManifest.model_validate(stored["manifest"]))
            await kv.put("model.tiny.1", json.dumps(stored).encode())
            await eventually(
                lambda: service.part(ModelStore).index.model("tiny", 1).manifest.files[0].sha256 == "0" * 64,
                what="index follows KV",
            )
            with pytest.raises(VerificationError, match="differs from the one that was signed"):
                await fetch_model(nc, "tiny:1", tmp_path / "cache")
            # 4. a signature by another key
            other = Signer.load_or_create(tmp_path / "other.pem")
            forged = model.model_copy(update={"signature": other.sign(model.manifest)})
            with pytest.raises(VerificationError, match="no valid signature by model-store key"):
                verify_manifest(forged, key)
            assert not (tmp_path / "cache" / "models").exists()
        finally:
            await nc.close()


async def test_cached_blob_corrupted_on_disk_is_fetched_again(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        source = make_checkpoint(tmp_path / "src", seed=1)
        await pushed(client, source)
        nc = await nats.connect(nats_server.url)
        try:
            local = await fetch_model(nc, "tiny", tmp_path / "cache")
            weights = local.path / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.unlink()  # hard link: rewrite the blob itself
            blob = (
                tmp_path
                / "cache"
                / "blobs"
                / next(f.sha256 for f in local.resolved.manifest.files if f.path == "model.safetensors")
            )
            blob.write_bytes(bytes(data))
            again = await fetch_model(nc, "tiny", tmp_path / "cache")
            assert (again.path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        finally:
            await nc.close()


async def test_events_registered_signed_aliased_deleted_dataset(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        nc = await nats.connect(nats_server.url)
        seen = []

        async def record(msg):
            seen.append(parse_event(msg.data, msg.subject))

        sub = await nc.subscribe("evt.>", cb=record)
        try:
            corpus = tmp_path / "corpus"
            corpus.mkdir()
            (corpus / "text.txt").write_text("in the beginning")
            files = await upload_dir(client, corpus)
            ds = await client.post(
                "/v1/datasets",
                json={
                    "name": "bible",
                    "files": [f.model_dump() for f in files],
                    "license": "public domain",
                    "source": "debian",
                },
            )
            assert ds.status_code == 201, ds.text
            digest = ds.json()["digest"]
            again = await client.post(
                "/v1/datasets",
                json={
                    "name": "bible",
                    "files": [f.model_dump() for f in files],
                    "license": "public domain",
                    "source": "debian",
                },
            )
            assert again.status_code == 200 and again.json()["digest"] == digest
            model = await pushed(
                client,
                make_checkpoint(tmp_path / "src", seed=1, extra={"training_record.json": '{"steps": 3}'}),
                datasets=[digest],
            )
            assert model.manifest.datasets == [digest] and model.manifest.training_record == {"steps": 3}
            unknown = await client.post(
                "/v1/models",
                json=PushModelRequest(name="x", files=model.manifest.files, datasets=["sha256:" + "1" * 64]).model_dump(
                    mode="json"
                ),
            )
            assert unknown.status_code == 400 and "is not registered" in unknown.text
            await client.post("/v1/aliases", json={"ref": "tiny:1", "alias": "prod"})
            await client.delete("/v1/models/tiny:1")
            wanted = ["dataset.registered", "model.registered", "model.signed", "model.aliased", "model.deleted"]
            await eventually(lambda: [e.type for e in seen] == wanted, what=f"events {wanted}")
            registered = seen[1].data
            assert registered.datasets == [digest] and registered.training_record.startswith("sha256:")
            assert registered.model == model.model and seen[4].data.model == model.model
            assert seen[3].data.alias == "prod" and seen[3].data.previous_version is None
            assert (await client.get(f"/v1/datasets/{digest}")).json()["manifest"]["name"] == "bible"
            assert (await client.get("/v1/datasets/bible")).json()["digest"] == digest
        finally:
            await sub.unsubscribe()
            await nc.close()
