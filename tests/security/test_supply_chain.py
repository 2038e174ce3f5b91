"""Supply chain, end to end: a model whose manifest was rewritten in the catalog, or re-signed by a key
that is not model-store's, reaches a real worker through a real deploy and ends in deploy.failed with
that reason, never loaded.

The changed-blob case and the wrong-digest case are tests/inference_worker/test_process.py::
test_a_tampered_blob_or_another_digest_fails_the_deploy_before_loading; the fetch-level checks are in
tests/model_store/test_verify_fetch.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from services.inference_worker.service_layer.worker import Worker
from services.model_store.domain.signing import Signer
from shared import rpc, subjects
from shared.catalog import CATALOG_BUCKET, ModelManifest, ResolvedModel, ResolveRequest, manifest_digest
from shared.events import DeployFailed, DeployReady, DeployScheduled
from tests.engine.conftest import tokenizer_dir  # noqa: F401  (fixture)
from tests.inference_worker.conftest import KV_BYTES, bus_client, make_worker  # noqa: F401  (fixtures)
from tests.inference_worker.test_process import long_ckpt, pushed  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


async def _rewrite_catalog(nc, pushed_model: ResolvedModel, change) -> ResolvedModel:  # noqa: F811
    """What someone with write access to the KV catalog could do; returns the record model-store now serves."""
    kv = await nc.jetstream().key_value(CATALOG_BUCKET)
    key = f"model.{pushed_model.model.name}.{pushed_model.model.version}"
    stored = json.loads((await kv.get(key)).value)
    change(stored)
    await kv.put(key, json.dumps(stored).encode())
    for _ in range(200):  # model-store's index follows the KV bucket
        served = await rpc.call(
            nc,
            subjects.rpc("model-store", "resolve"),
            ResolveRequest(ref=key.split(".", 1)[1].replace(".", ":")),
            ResolvedModel,
        )
        if served.model.digest == stored["model"]["digest"] and served.signature == stored["signature"]:
            return served
        await asyncio.sleep(0.05)
    raise AssertionError("model-store did not serve the rewritten record")


async def _deploy_fails(bus, model, deployment_id: str, node_id: str) -> str:
    await bus.emit(
        DeployScheduled(
            deployment_id=deployment_id,
            model=model,
            node_id=node_id,
            device="cpu",
            predicted_bytes=1,
            context_length=64,
            kv_cache_bytes=KV_BYTES,
        )
    )
    return (await bus.wait(DeployFailed, deployment_id=deployment_id)).reason


async def test_a_rewritten_manifest_or_a_foreign_signature_ends_in_deploy_failed(
    nats_server, tmp_path, pushed, bus_client
):  # noqa: F811
    worker = make_worker(nats_server.url, tmp_path / "w", None, node_id="node-sc")  # None: model-store's verified fetch
    async with worker.running():
        # 1. the manifest (its license) rewritten together with its digest: the signature no longer covers it
        def relicense(stored: dict) -> None:
            stored["manifest"]["license"] = "proprietary"
            stored["model"]["digest"] = manifest_digest(ModelManifest.model_validate(stored["manifest"]))

        rewritten = await _rewrite_catalog(bus_client.nc, pushed, relicense)
        reason = await _deploy_fails(bus_client, rewritten.model, "dep-rewritten", "node-sc")
        assert reason.startswith("verification failed") and "differs from the one that was signed" in reason, reason

        # 2. the same, re-signed with the attacker's own key: not model-store's key
        other = Signer.load_or_create(tmp_path / "attacker.pem")

        def resign(stored: dict) -> None:
            stored["signature"] = other.sign(ModelManifest.model_validate(stored["manifest"]))

        resigned = await _rewrite_catalog(bus_client.nc, pushed, resign)
        reason = await _deploy_fails(bus_client, resigned.model, "dep-resigned", "node-sc")
        assert reason.startswith("verification failed") and "no valid signature by model-store key" in reason, reason

        assert not bus_client.of(DeployReady)
        listing = await worker.part(Worker).loaded(None)
        assert {d.state for d in listing.deployments} == {"failed"}
        assert not list((tmp_path / "w").rglob("*.safetensors"))  # nothing of it was even kept in the cache
