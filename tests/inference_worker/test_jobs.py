"""Batch jobs over JetStream: processed once per request id across two workers, results stored with
the request id, duplicates give one result, bad jobs get a typed result or a dead letter."""

from __future__ import annotations

import asyncio

import pytest

from services.inference_worker.service_layer.worker import Worker
from shared import subjects
from shared.inference import JOBS_STREAM, RESULTS_STREAM, InferenceRequest
from shared.inference_jobs import job_result, submit_job
from tests.inference_worker.conftest import deployed, make_worker
from tests.support.helpers import eventually


async def test_jobs_are_processed_once_across_two_workers_and_duplicates_give_one_result(
        nats_server, tmp_path, ckpts, bus_client):
    a = make_worker(nats_server.url, tmp_path / "a", ckpts, node_id="node-a")
    b = make_worker(nats_server.url, tmp_path / "b", ckpts, node_id="node-b")
    js = bus_client.nc.jetstream()
    async with a.running(), b.running():
        await deployed(bus_client, "tiny", deployment_id="dep-a", node_id="node-a")
        await deployed(bus_client, "tiny", deployment_id="dep-b", node_id="node-b")
        jobs = [InferenceRequest(request_id=f"job-{i}", model="tiny", prompt=f"It was {i}",
                                 sampling={"max_tokens": 4, "temperature": 0}) for i in range(8)]
        acks = await asyncio.gather(*(submit_job(js, j) for j in jobs))
        assert not any(ack.duplicate for ack in acks)
        assert (await submit_job(js, jobs[0])).duplicate  # the same id again: JetStream drops it

        async def all_done() -> bool:
            return all([await job_result(js, j.request_id) for j in jobs])

        done = False
        for _ in range(300):
            if done := await all_done():
                break
            await asyncio.sleep(0.1)
        assert done, "every job has a result"
        for j in jobs:
            result = await job_result(js, j.request_id)
            assert result.ok and result.result["request_id"] == j.request_id
            assert result.result["usage"]["completion_tokens"] == 4
        # a late duplicate, past the duplicate window (another message id): skipped, not run again
        await js.publish(subjects.inference_job("tiny"), jobs[1].model_dump_json().encode(), stream=JOBS_STREAM,
                         headers={"Nats-Msg-Id": "another-id"})
        await eventually(
            lambda: (a.part(Worker).jobs.processed + b.part(Worker).jobs.processed) == 8 and _drained(js),
            10,
            "the late duplicate acknowledged",
        )
        await asyncio.sleep(0.3)
        info = await js.stream_info(RESULTS_STREAM)
        assert info.state.messages == 8
        assert a.part(Worker).jobs.processed + b.part(Worker).jobs.processed == 8
        assert a.part(Worker).jobs.processed > 0 and b.part(Worker).jobs.processed > 0  # the consumer is shared


_pending: dict[str, int] = {}


def _drained(js) -> bool:
    return _pending.get("n", 1) == 0


@pytest.fixture(autouse=True)
async def _watch_jobs_stream(bus_client):
    """Keeps the JOBS stream's message count in _pending for eventually() (a sync predicate)."""
    js = bus_client.nc.jetstream()
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            try:
                _pending["n"] = (await js.stream_info(JOBS_STREAM)).state.messages
            except Exception:
                pass
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(poll())
    yield
    stop.set()
    await task
    _pending.clear()


async def test_a_bad_job_gets_a_typed_result_or_a_dead_letter(worker, bus_client):
    js = bus_client.nc.jetstream()
    await deployed(bus_client, "tiny")
    await js.publish(subjects.inference_job("tiny"), b'{"request_id": "bad-1", "model": "tiny"}', stream=JOBS_STREAM)
    await js.publish(
        subjects.inference_job("tiny"), b'{"request_id": "pin-1", "model": "tiny:9", "prompt": "x"}', stream=JOBS_STREAM
    )
    await js.publish(subjects.inference_job("tiny"), b"garbage", stream=JOBS_STREAM)
    for _ in range(200):
        if await job_result(js, "bad-1") and await job_result(js, "pin-1"):
            break
        await asyncio.sleep(0.05)
    bad, pin = await job_result(js, "bad-1"), await job_result(js, "pin-1")
    assert not bad.ok and bad.error.code == "invalid" and "exactly one" in bad.error.message
    assert not pin.ok and pin.error.code == "not_found"
    await eventually(lambda: _pending.get("n") == 0, 10, "the garbage job leaves the work queue")
    info = await js.stream_info(subjects.DEADLETTER_STREAM)
    letter = await js.get_last_msg(subjects.DEADLETTER_STREAM, subjects.dead_letter("inference-worker"))
    assert info.state.messages >= 1 and b"invalid job" in letter.data and b"garbage" in letter.data
