"""Two model-store replicas on one NATS share one catalog: KV is the truth, each index follows it."""

from __future__ import annotations

import asyncio

import httpx
import nats
import pytest

from services.model_store.service_layer.handlers import ModelStore
from shared import errors, rpc, subjects
from shared.catalog import DatasetList, DatasetRequest, ListRequest, ModelList, PushModelRequest, ResolvedDataset
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import eventually, make_service


def http(service) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store")


async def test_replicas_share_versions_aliases_and_deletes(nats_server, tmp_path):
    a = make_service("model-store", nats_server.url, tmp_path / "a", node_id="node-a")
    b = make_service("model-store", nats_server.url, tmp_path / "b", node_id="node-b")
    async with a.running(), b.running(), http(a) as ca, http(b) as cb:
        dirs = [make_checkpoint(tmp_path / f"m{i}", seed=i) for i in range(6)]
        files = [await upload_dir(ca, d) for d in dirs]

        async def push(client, fs):
            r = await client.post("/v1/models", json=PushModelRequest(name="shared", files=fs).model_dump(mode="json"))
            assert r.status_code == 201, r.text
            return r.json()["model"]["version"]

        versions = await asyncio.gather(*(push(ca if i % 2 else cb, fs) for i, fs in enumerate(files)))
        assert sorted(versions) == [1, 2, 3, 4, 5, 6]  # compare-and-set on KV: no version handed out twice

        await eventually(
            lambda: len(b.part(ModelStore).index.models("shared")) == 6, what="replica b's index has all six"
        )
        await ca.post("/v1/aliases", json={"ref": "shared:3", "alias": "canary"})
        assert (await cb.get("/v1/models/shared@canary")).json()["model"]["version"] == 3  # KV fallback or index
        assert (await cb.delete("/v1/models/shared/aliases/canary")).status_code == 204
        assert (await cb.delete("/v1/models/shared/aliases/canary")).status_code == 404
        await eventually(
            lambda: a.part(ModelStore).index.alias("shared", "canary") is None, what="alias removal reaches a"
        )
        await cb.delete("/v1/models/shared:6")
        await eventually(lambda: a.part(ModelStore).index.model("shared", 6) is None, what="delete reaches a")
        assert (await ca.get("/v1/models/shared")).json()["model"]["version"] == 5
        config = await cb.get("/v1/models/shared:1/files/config.json")
        assert config.status_code == 200 and config.content == (dirs[0] / "config.json").read_bytes()
        assert (await cb.get("/v1/models/shared:1/files/nope.bin")).status_code == 404
        assert (await cb.get("/v1/blobs/" + "0" * 64)).status_code == 404
        assert (await cb.get("/v1/blobs/not-a-digest")).status_code == 400

        nc = await nats.connect(nats_server.url)
        try:
            listed = await rpc.call(nc, subjects.rpc("model-store", "list"), ListRequest(name="shared"), ModelList)
            assert [m.model.version for m in listed.models] == [1, 2, 3, 4, 5]
            assert (
                await rpc.call(nc, subjects.rpc("model-store", "datasets"), ListRequest(), DatasetList)
            ).datasets == []
            with pytest.raises(errors.NotFound):
                await rpc.call(
                    nc,
                    subjects.rpc("model-store", "dataset"),
                    DatasetRequest(ref="sha256:" + "0" * 64),
                    ResolvedDataset,
                )
        finally:
            await nc.close()
