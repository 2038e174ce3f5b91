"""The worker as `strata up` runs it (a subprocess), with checkpoints fetched and verified through
the real model-store: SIGTERM drains a stream in flight; a worker killed mid-job leaves the job to
another worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter

from services.inference_worker.service_layer.worker import Worker
from shared import subjects
from shared.catalog import PushModelRequest, ResolvedModel
from shared.events import ModelId, DeployReady, DeployScheduled, DeployUnloaded, InferenceCompleted
from shared.inference import JOBS_STREAM, InferenceRequest, StreamMessage
from shared.inference_jobs import job_result, submit_job
from services.inference_worker.service_layer.jobs import JobOptions, durable_name
from tests.engine.conftest import build_checkpoint
from tests.inference_worker.conftest import KV_BYTES, make_worker, model_id
from tests.model_store.conftest import free_port, upload_dir
from tests.support.helpers import eventually, make_service

from services.inference_worker.adapters.artifacts import ModelStoreSource  # noqa: F401  (the default source)

ROOT = Path(__file__).resolve().parents[2]
STREAM = TypeAdapter(StreamMessage)
LONG = 1500  # tokens: a few seconds of generation for the tiny model


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("long") / "long", tokenizer_dir, seed=3, num_hidden_layers=1,
                            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=4096).path


@pytest.fixture
async def pushed(nats_server, tmp_path, long_ckpt, monkeypatch) -> ResolvedModel:
    """model-store running in-process with the checkpoint pushed (and signed)."""
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    store = make_service("model-store", nats_server.url, tmp_path / "store")
    async with store.running():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=store.http), base_url="http://store") as client:
            files = await upload_dir(client, long_ckpt)
            r = await client.post("/v1/models", json=PushModelRequest(name="long", files=files).model_dump(mode="json"))
            assert r.status_code == 201, r.text
        yield ResolvedModel.model_validate(r.json())


def spawn_worker(nats_url: str, data_dir: Path, node_id: str) -> subprocess.Popen:
    env = {**os.environ, "STRATA_NATS_URL": nats_url, "STRATA_DATA_DIR": str(data_dir), "STRATA_NODE_ID": node_id,
           "STRATA_INFERENCE_WORKER_PORT": str(free_port()), "STRATA_INFERENCE_WORKER_JOB_ACK_WAIT": "2",
           "OMP_NUM_THREADS": "1", "STRATA_MODEL_STORE_BUILTIN": "0"}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "worker.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "inference-worker"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


async def deploy(bus_client, model: ModelId, deployment_id: str, node_id: str, context: int = 2048) -> DeployReady:
    await bus_client.emit(DeployScheduled(deployment_id=deployment_id, model=model, node_id=node_id, device="cpu",
                                          predicted_bytes=1, context_length=context, model_ref="long",
                                          kv_cache_bytes=KV_BYTES, dtype="float32"))
    return await bus_client.wait(DeployReady, timeout=90, deployment_id=deployment_id)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def test_sigterm_finishes_the_stream_in_flight_then_unloads_and_exits(nats_server, tmp_path, pushed, bus_client):
    proc = spawn_worker(nats_server.url, tmp_path / "w1", "node-sub")
    try:
        ready = await deploy(bus_client, pushed.model, "dep-sub", "node-sub")
        assert ready.measured.weights > 0 and ready.model.digest == pushed.model.digest  # fetched, verified, loaded
        req = InferenceRequest(
            model="long", stream=True, prompt="It was", sampling={"max_tokens": LONG, "temperature": 0}
        )
        inbox = bus_client.nc.new_inbox()
        sub = await bus_client.nc.subscribe(inbox)
        await bus_client.nc.publish(subjects.inference_request("long"), req.model_dump_json().encode(), reply=inbox)
        messages = []
        while not any(m.kind == "chunk" for m in messages):
            messages.append(STREAM.validate_json((await sub.next_msg(timeout=30)).data))
        proc.send_signal(signal.SIGTERM)
        while messages[-1].kind not in ("end", "error"):
            messages.append(STREAM.validate_json((await sub.next_msg(timeout=30)).data))
        end = messages[-1]
        assert end.kind == "end" and end.finish_reason == "length" and end.usage.completion_tokens == LONG
        await bus_client.wait(DeployUnloaded, deployment_id="dep-sub")
        # a clean exit: uvicorn ran the shutdown, then re-raised SIGTERM as it does after a graceful stop
        assert await asyncio.to_thread(proc.wait, 30) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "w1" / "worker.log").read_text()
        assert bus_client.of(InferenceCompleted, request_id=req.request_id)
    finally:
        stop(proc)


async def test_a_worker_killed_mid_job_leaves_the_job_to_another(nats_server, tmp_path, pushed, bus_client):
    js = bus_client.nc.jetstream()
    proc = spawn_worker(nats_server.url, tmp_path / "w1", "node-sub")
    try:
        await deploy(bus_client, pushed.model, "dep-sub", "node-sub")
        job = InferenceRequest(
            request_id="long-job", model="long", prompt="It was", sampling={"max_tokens": LONG, "temperature": 0}
        )
        await submit_job(js, job)
        for _ in range(300):
            info = await js.consumer_info(JOBS_STREAM, durable_name("long"))
            if info.num_ack_pending == 1:
                break
            await asyncio.sleep(0.02)
        assert info.num_ack_pending == 1, "the subprocess took the job"
        proc.kill()  # dies mid-job: no ack, no result
        proc.wait(10)
        assert await job_result(js, "long-job") is None
        # another worker, fetching through the real model-store adapter (no artifact override)
        other = make_worker(
            nats_server.url, tmp_path / "w2", None, node_id="node-b", jobs=JobOptions(ack_wait_s=2.0)
        )
        async with other.running():
            await deploy(bus_client, pushed.model, "dep-b", "node-b")
            result = None
            for _ in range(600):
                if result := await job_result(js, "long-job"):
                    break
                await asyncio.sleep(0.05)
            assert result is not None and result.ok, result
            assert result.result["usage"]["completion_tokens"] == LONG
            # the result is stored before the job is acked and counted: under load the test can read it first
            await eventually(lambda: other.part(Worker).jobs.processed == 1, 10, "node-b counted the job it ran")
    finally:
        stop(proc)


async def test_a_tampered_blob_or_another_digest_fails_the_deploy_before_loading(
    nats_server, tmp_path, pushed, bus_client
):
    from shared.catalog import BLOB_BUCKET
    from shared.events import DeployFailed

    worker = make_worker(nats_server.url, tmp_path / "w", None, node_id="node-v")  # None: model-store's verified fetch
    async with worker.running():
        # someone with write access rewrote the weights in the Object Store
        weights = next(f for f in pushed.manifest.files if f.path == "model.safetensors")
        store = await bus_client.nc.jetstream().object_store(BLOB_BUCKET)
        original = (await store.get(weights.sha256)).data
        await store.put(weights.sha256, original[:-1] + bytes([original[-1] ^ 0x01]))
        await bus_client.emit(
            DeployScheduled(
                deployment_id="dep-tampered",
                model=pushed.model,
                node_id="node-v",
                device="cpu",
                predicted_bytes=1,
                context_length=64,
                kv_cache_bytes=KV_BYTES,
            )
        )
        failed = await bus_client.wait(DeployFailed, deployment_id="dep-tampered")
        assert failed.reason.startswith("verification failed") and "model.safetensors" in failed.reason
        await store.put(weights.sha256, original)  # repaired: what fails now is the digest alone
        # a deployment naming another digest than model-store serves for that version
        forged = pushed.model.model_copy(update={"digest": "sha256:" + "0" * 64})
        await bus_client.emit(
            DeployScheduled(
                deployment_id="dep-forged",
                model=forged,
                node_id="node-v",
                device="cpu",
                predicted_bytes=1,
                context_length=64,
                kv_cache_bytes=KV_BYTES,
            )
        )
        failed = await bus_client.wait(DeployFailed, deployment_id="dep-forged")
        assert failed.reason.startswith("verification failed") and pushed.model.digest in failed.reason
        assert not bus_client.of(DeployReady)
        listing = await worker.part(Worker).loaded(None)
        assert {d.state for d in listing.deployments} == {"failed"}


async def test_a_queued_stream_gets_started_and_keepalives_until_its_turn(nats_server, tmp_path, long_ckpt, bus_client):
    from services.inference_worker.service_layer.deployments import EngineOptions

    worker = make_worker(nats_server.url, tmp_path / "w", {"long": long_ckpt}, engine=EngineOptions(max_num_seqs=1))
    async with worker.running():
        await deploy(bus_client, model_id("long"), "dep-long", "node-a", context=4096)
        first = asyncio.ensure_future(
            bus_client.request(
                "long",
                prompt="It was",  # seconds of work ahead
                sampling={"max_tokens": 4000, "temperature": 0},
            )
        )
        loop = worker.part(Worker).deployments.by_key["dep-long/0"].loop
        await eventually(lambda: loop.stats.tokens > 0, 10, "the long request generating")
        req = InferenceRequest(model="long", stream=True, prompt="Call me", sampling={"max_tokens": 2})
        inbox = bus_client.nc.new_inbox()
        sub = await bus_client.nc.subscribe(inbox)
        await bus_client.nc.publish(subjects.inference_request("long"), req.model_dump_json().encode(), reply=inbox)
        kinds = []
        while not kinds or kinds[-1] not in ("end", "error"):
            kinds.append(STREAM.validate_json((await sub.next_msg(timeout=30)).data).kind)
        assert kinds[0] == "started" and kinds[-1] == "end"
        assert kinds[1 : kinds.index("chunk")].count("keepalive") >= 1  # waited behind the long request, not silent
        assert (await first).ok
