"""#20 item 4, the worker's path: a deploy whose blob is corrupt in the store fails at once with that
reason (not "no data from the Object Store for 20.0s", which reads as an outage and is retried)."""

from __future__ import annotations

import time

import pytest

from shared.events import DeployFailed
from services.inference_worker.entrypoints.app import create_service
from tests.inference_worker.conftest import worker_options
from tests.model_store.conftest import lose_chunk, make_checkpoint
from tests.model_store.test_verify_fetch import http, pushed
from tests.support.helpers import make_service, settings_for


@pytest.fixture(autouse=True)
def _no_builtin(monkeypatch):
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")


async def test_a_deploy_of_a_corrupt_blob_fails_saying_so(nats_server, tmp_path, bus_client):
    store = make_service("model-store", nats_server.url, tmp_path / "store")
    settings = settings_for("inference-worker", nats_server.url, tmp_path / "worker", "node-a")
    worker = create_service(settings, options=worker_options())  # fetches from model-store
    async with store.running(), http(store) as client, worker.running():
        model = await pushed(client, make_checkpoint(tmp_path / "src", seed=1))
        weights = next(f for f in model.manifest.files if f.path == "model.safetensors")
        await lose_chunk(nats_server.url, weights.sha256)

        started = time.monotonic()
        await bus_client.schedule("tiny")
        failed = await bus_client.wait(DeployFailed, deployment_id="dep-tiny", timeout=15)
        assert f"blob sha256:{weights.sha256} is corrupt in the store" in failed.reason
        assert "no data from the Object Store" not in failed.reason
        assert time.monotonic() - started < 10  # not a fetch timeout, and not retried as one
