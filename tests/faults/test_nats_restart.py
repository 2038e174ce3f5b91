"""Fault: restart nats-server (same port, same JetStream store) while events stream in and requests
flow. Every service reconnects by itself and resumes: the worker and the gateway serve again, the
foundation's durable pull consumer and the ledger's own pull consumer handle every event whose
publish was acknowledged exactly once."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from services.provenance_ledger.service_layer.ledger import Ledger
from shared.service import Service
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.faults.support import (
    CountingConsumer, EventWatch, PublishTally, completed_event, exactly_once, spawn_worker, stop_process,
)
from tests.faults.test_worker_kill import one_request
from tests.support.helpers import eventually, make_service, settings_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(180)

SENT = 60
RESTART_AFTER = 20
GATEWAY = TEST_CONFIG.model_copy(update={"silence_timeout_s": 5.0, "request_timeout_s": 30.0})


def in_ledger(ledger: Ledger, event_id: str) -> bool:
    return ledger.store.leaf_by_event(event_id) is not None


async def test_restart_nats_server_under_load(nats_server, tmp_path, fault_summary):
    worker = spawn_worker(nats_server.url, tmp_path / "worker", "node-r")
    watch = await EventWatch.connect(nats_server.url)
    ledger = make_service("provenance-ledger", nats_server.url, tmp_path / "ledger")
    counting = CountingConsumer.build(nats_server.url, tmp_path / "consumer")
    publisher = Service("fault-publisher", settings_for("fault-publisher", nats_server.url, tmp_path / "publisher"))
    tally = PublishTally()
    requests: list[tuple[str, str]] = []
    try:
        async with ledger.running(), counting.service.running(), publisher.running():
            await watch.deploy(["node-r"])
            with serve_gateway(nats_server.url, tmp_path / "gateway", GATEWAY) as gateway:
                client = gateway.client().with_options(timeout=60.0)
                assert (await one_request(client, 0))[0] == "answered"

                async def publish_all() -> None:
                    for i in range(SENT):
                        await tally.publish(publisher, completed_event(i, "restart"))
                        await asyncio.sleep(0.02)

                async def keep_asking(stop: asyncio.Event) -> None:
                    i = 1
                    while not stop.is_set():
                        requests.append(await one_request(client, i))
                        i += 1

                stop_asking = asyncio.Event()
                publishing = asyncio.create_task(publish_all())
                asking = asyncio.create_task(keep_asking(stop_asking))
                await eventually(lambda: len(tally.acked) >= RESTART_AFTER, 30, f"{RESTART_AFTER} events acknowledged")
                await asyncio.to_thread(nats_server.restart)
                await publishing
                # serving again: a request through gateway and worker succeeds (each reconnects by itself)
                await eventually(lambda: requests and requests[-1][0] == "answered" and len(requests) > 3, 60,
                                 "a request answered after the restart")
                stop_asking.set()
                await asking
                after = [await one_request(client, 1000 + i) for i in range(3)]

                # every acknowledged event handled exactly once by both pull consumers
                await eventually(lambda: all(counting.calls[e] for e in tally.acked), 60,
                                 "the foundation consumer handling every acknowledged event")
                lg = ledger.part(LedgerApp).ledger
                await eventually(lambda: all(in_ledger(lg, e) for e in tally.acked), 60,
                                 "the ledger logging every acknowledged event")
                await asyncio.sleep(1.0)  # a redelivery of an event acked before the restart would show now
                ledger_missing = sum(1 for e in tally.acked if not in_ledger(lg, e))
                conflicts = lg.stats.conflicts
                health = {s.name: s.health() for s in (ledger, counting.service, publisher, gateway.service)}
                worker_health = httpx.get(worker.health_url, timeout=5)

        lost, duplicated = exactly_once(tally.acked, counting.calls)
        request_kinds = [kind for kind, _ in requests]
        fault_summary("nats-restart", sent=SENT, answered=len(tally.acked), errored=len(tally.failed),
                      lost=lost + ledger_missing + request_kinds.count("lost"), duplicated=duplicated,
                      requests=len(requests), requests_errored=request_kinds.count("errored"),
                      requests_after_ok=[k for k, _ in after].count("answered"))
        assert lost == 0 and ledger_missing == 0 and duplicated == 0
        assert "lost" not in request_kinds, requests
        assert [k for k, _ in after] == ["answered"] * 3, after
        assert {name: h.status for name, h in health.items()} == dict.fromkeys(health, "ok")
        assert worker_health.status_code == 200 and worker_health.json()["nats_connected"]
        assert conflicts == 0
    finally:
        stop_process(worker)
        await watch.nc.close()
