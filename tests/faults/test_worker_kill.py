"""Fault: kill -9 one of two worker processes while 40 requests are in flight through the real
gateway (uvicorn) and the official openai client. Every accepted request ends in exactly one final
answer or one explicit HTTP error; none hangs, none is answered twice; new requests succeed on the
surviving worker."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from shared.events import InferenceCompleted
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.faults.support import MODEL, EventWatch, spawn_worker, stop_process
from tests.support.helpers import eventually
from tests.support.live import in_flight_by_node

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(180)

SENT = 40
CLIENT_TIMEOUT_S = 90.0  # far beyond the gateway's own limits: a request still open then is lost
GATEWAY = TEST_CONFIG.model_copy(update={"silence_timeout_s": 5.0, "request_timeout_s": 60.0})


async def one_request(client, i: int) -> tuple[str, str]:
    """("answered", request id) | ("errored", status) | ("lost", why). Odd requests stream."""
    prompt = f"Once upon a time, story {i},"
    try:
        if i % 2 == 0:
            reply = await client.completions.create(model=MODEL.name, prompt=prompt, max_tokens=48, temperature=0)
            return "answered", reply.id.removeprefix("cmpl-")
        stream = await client.completions.create(
            model=MODEL.name, prompt=prompt, max_tokens=48, temperature=0, stream=True
        )
        finish, request_id = None, None
        async for chunk in stream:
            request_id = chunk.id.removeprefix("cmpl-")
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        if finish is None:
            return "lost", f"stream {request_id} ended without a finish reason or an error"
        return "answered", request_id or "?"
    except openai.APIConnectionError as exc:  # a timeout or a dropped connection: no explicit answer
        return "lost", f"{type(exc).__name__}: {exc}"
    except openai.APIStatusError as exc:
        return "errored", str(exc.status_code)
    except openai.APIError as exc:  # an error event inside a stream: explicit, with a message
        return "errored", f"stream: {exc.message}"


async def test_kill_9_a_worker_under_load(nats_server, tmp_path, fault_summary):
    watch = await EventWatch.connect(nats_server.url)
    # two sequences at a time per worker: the 40 requests queue up, so the kill always lands on work
    procs = {
        node: spawn_worker(nats_server.url, tmp_path / node, node, STRATA_INFERENCE_WORKER_MAX_NUM_SEQS="2")
        for node in ("node-1", "node-2")
    }
    try:
        await watch.deploy(list(procs))
        with serve_gateway(nats_server.url, tmp_path / "gateway", GATEWAY) as gateway:
            client = gateway.client().with_options(timeout=CLIENT_TIMEOUT_S)
            tasks = [asyncio.create_task(one_request(client, i)) for i in range(SENT)]
            await eventually(lambda: sum(t.done() for t in tasks) >= 4, 60, "the first answers")
            carrying = await in_flight_by_node(watch.nc, workers=len(procs))
            victim = max(procs, key=lambda node: carrying.get(node, 0))
            procs[victim].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[victim].wait, 10)
            done, pending = await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + 30)
            outcomes = [t.result() if t in done else ("lost", "never finished") for t in tasks]

            # healthy again: the survivor answers every new request, and the model is still listed
            after = [await one_request(client, SENT + i) for i in range(4)]
            listed = [m.id for m in (await client.models.list()).data]

        kinds = Counter(kind for kind, _ in outcomes)
        answered_ids = [detail for kind, detail in outcomes if kind == "answered"]
        # each answered request was completed by exactly one worker (its inference.completed event)
        await eventually(
            lambda: {c.request_id for c in watch.of(InferenceCompleted)} >= set(answered_ids),
            20,
            "an inference.completed event for every answered request",
        )
        completions = Counter(c.request_id for c in watch.of(InferenceCompleted))
        twice = [rid for rid in answered_ids if completions[rid] != 1]
        lost = kinds["lost"] + len(twice)
        fault_summary(
            "worker-kill",
            sent=SENT,
            answered=kinds["answered"],
            errored=kinds["errored"],
            lost=lost,
            in_flight_on_victim=carrying.get(victim, 0),
            after_kill_ok=sum(k == "answered" for k, _ in after),
        )
        assert lost == 0, ([o for o in outcomes if o[0] == "lost"], twice)
        assert kinds["answered"] + kinds["errored"] == SENT
        assert {detail for kind, detail in outcomes if kind == "errored"} <= {"502", "503", "504"} | {
            d for k, d in outcomes if k == "errored" and d.startswith("stream:")
        }
        assert [kind for kind, _ in after] == ["answered"] * 4, after
        assert listed == [MODEL.name]
        assert procs[next(n for n in procs if n != victim)].poll() is None, "the survivor is still running"
    finally:
        for proc in procs.values():
            stop_process(proc)
        await watch.nc.close()
