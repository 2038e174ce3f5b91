"""Push, list, resolve, alias, delete + GC, dedup and restart, through the real nats-server."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import nats
import pytest

from shared import errors, rpc, subjects
from shared.catalog import (
    ListRequest, ModelList, PublicKey, PublicKeyRequest, PushModelRequest, ResolvedModel, ResolveRequest,
    manifest_digest,
)
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import make_service


def http(service) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store")


async def push(client, directory, name, **extra):
    files = await upload_dir(client, directory)
    body = PushModelRequest(name=name, files=files, **extra).model_dump(mode="json")
    return await client.post("/v1/models", json=body)


async def test_push_list_resolve_by_version_and_alias(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        nc = await nats.connect(nats_server.url)
        try:
            first = await push(client, make_checkpoint(tmp_path / "a", seed=1), "tiny")
            second = await push(client, make_checkpoint(tmp_path / "b", seed=2), "tiny")
            assert first.status_code == 201 and second.status_code == 201, first.text
            v1, v2 = ResolvedModel.model_validate(first.json()), ResolvedModel.model_validate(second.json())
            assert (v1.model.version, v2.model.version) == (1, 2)
            meta = v1.manifest.metadata
            assert (meta.architecture, meta.num_layers, meta.num_heads, meta.num_kv_heads, meta.head_dim) == (
                "LlamaForCausalLM",
                1,
                2,
                1,
                4,
            )
            assert meta.parameters == 32 * 8 * 2 + 16 * 8 and meta.weight_bytes == 32 * 8 * 4 * 2 + 16 * 8 * 2
            assert meta.dtype == "F32" and meta.context_length == 64
            assert v1.model.digest == manifest_digest(v1.manifest)

            resolve = subjects.rpc("model-store", "resolve")
            assert (await rpc.call(nc, resolve, ResolveRequest(ref="tiny"), ResolvedModel)).model.version == 2
            assert (await rpc.call(nc, resolve, ResolveRequest(ref="tiny:1"), ResolvedModel)).model == v1.model
            alias = await client.post("/v1/aliases", json={"ref": "tiny:1", "alias": "prod"})
            assert alias.json()["previous_version"] is None
            assert (await rpc.call(nc, resolve, ResolveRequest(ref="tiny@prod"), ResolvedModel)).model == v1.model
            moved = await client.post("/v1/aliases", json={"ref": "tiny:2", "alias": "prod"})
            assert moved.json()["previous_version"] == 1
            by_alias = await client.get("/v1/models/tiny@prod")
            assert by_alias.json()["model"]["version"] == 2 and by_alias.json()["aliases"] == ["prod"]

            listed = await rpc.call(nc, subjects.rpc("model-store", "list"), ListRequest(), ModelList)
            assert [(m.model.name, m.model.version, m.aliases) for m in listed.models] == [
                ("tiny", 1, []),
                ("tiny", 2, ["prod"]),
            ]
            key = await rpc.call(nc, subjects.rpc("model-store", "public_key"), PublicKeyRequest(), PublicKey)
            assert (await client.get("/v1/public-key")).json()["key_id"] == key.key_id

            for ref, error in (
                ("nope", errors.NotFound),
                ("tiny:9", errors.NotFound),
                ("tiny@canary", errors.NotFound),
                ("tiny:zero", errors.Invalid),
                ("bad name", errors.Invalid),
            ):
                with pytest.raises(error):
                    await rpc.call(nc, resolve, ResolveRequest(ref=ref), ResolvedModel)
            assert (await client.get("/v1/models/tiny:9")).status_code == 404
            assert (await client.get("/v1/models/tiny::")).status_code == 400
        finally:
            await nc.close()


async def test_duplicate_push_is_deduplicated_and_concurrent_pushes_get_distinct_versions(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        directory = make_checkpoint(tmp_path / "a", seed=1)
        first, again = await push(client, directory, "tiny"), await push(client, directory, "tiny")
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["model"] == again.json()["model"]
        dirs = [make_checkpoint(tmp_path / f"c{i}", seed=10 + i) for i in range(4)]
        results = await asyncio.gather(*(push(client, d, "busy") for d in dirs))
        assert sorted(r.json()["model"]["version"] for r in results) == [1, 2, 3, 4]


async def test_restart_with_wiped_index_lists_every_model(nats_server, tmp_path):
    data = tmp_path / "data"
    service = make_service("model-store", nats_server.url, data)
    async with service.running(), http(service) as client:
        for i, name in enumerate(("alpha", "beta", "beta")):
            assert (await push(client, make_checkpoint(tmp_path / f"m{i}", seed=i), name)).status_code == 201
        await client.post("/v1/aliases", json={"ref": "beta:1", "alias": "prod"})
    shutil.rmtree(data / "model-store")  # the whole local disk: index and key file
    (data / "model-store").mkdir()
    service = make_service("model-store", nats_server.url, data)
    async with service.running(), http(service) as client:
        listed = (await client.get("/v1/models")).json()["models"]
        assert [(m["model"]["name"], m["model"]["version"], m["aliases"]) for m in listed] == [
            ("alpha", 1, []),
            ("beta", 1, ["prod"]),
            ("beta", 2, []),
        ]
        assert (await client.get("/v1/models/beta@prod")).json()["model"]["version"] == 1


async def test_delete_collects_unreferenced_blobs_and_keeps_shared_ones(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        a = (await push(client, make_checkpoint(tmp_path / "a", seed=1), "tiny")).json()
        b = (await push(client, make_checkpoint(tmp_path / "b", seed=2), "tiny")).json()
        await client.post("/v1/aliases", json={"ref": "tiny:1", "alias": "prod"})

        def shas(m):
            return {f["path"]: f["sha256"] for f in m["manifest"]["files"]}

        assert shas(a)["config.json"] == shas(b)["config.json"]
        bare = await client.delete("/v1/models/tiny")
        assert bare.status_code == 400 and "names no version" in bare.json()["error"]["message"]
        gone = await client.delete("/v1/models/tiny@prod")
        assert gone.status_code == 200, gone.text
        assert gone.json()["blobs_removed"] == [shas(a)["model.safetensors"]]
        assert (await client.head(f"/v1/blobs/{shas(a)['model.safetensors']}")).status_code == 404
        for shared in ("config.json", "tokenizer.json"):
            assert (await client.head(f"/v1/blobs/{shas(a)[shared]}")).status_code == 200
        assert (await client.get("/v1/models/tiny@prod")).status_code == 404
        assert (await client.get("/v1/models/tiny:1")).status_code == 404
        assert (await client.get("/v1/models/tiny")).json()["model"]["version"] == 2
        everything = await client.delete("/v1/models/tiny", params={"all_versions": True})
        assert [m["version"] for m in everything.json()["deleted"]] == [2]
        assert (await client.get("/v1/models")).json() == {"models": []}
        # versions are never handed out twice, even after a delete
        assert (await push(client, make_checkpoint(tmp_path / "c", seed=3), "tiny")).json()["model"]["version"] == 3
