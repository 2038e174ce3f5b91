"""Fault: a 3-node NATS cluster on loopback with EVENTS at 3 replicas; kill -9 the server that leads
the EVENTS stream while events stream in. The services (connected with the cluster's URL list)
carry on: every acknowledged event is handled exactly once by the foundation's pull consumer and
logged once by the ledger, and the stream keeps 3 replicas configured with 2 current."""

from __future__ import annotations

import asyncio

import nats
import pytest

from cli.cluster import LocalCluster
from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from services.provenance_ledger.service_layer.ledger import Ledger
from shared import subjects
from shared.service import Service
from tests.faults.support import CountingConsumer, PublishTally, completed_event, exactly_once
from tests.support.helpers import eventually, make_service, settings_for

pytestmark = pytest.mark.timeout(180)

SENT = 60
KILL_AFTER = 20


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_STREAM_REPLICAS", "3")  # every service declares EVENTS at R3
    with LocalCluster(tmp_path / "nats", size=3) as running:
        yield running


def in_ledger(ledger: Ledger, event_id: str) -> bool:
    return ledger.store.leaf_by_event(event_id) is not None


async def test_kill_9_one_node_of_a_3_node_cluster(cluster, tmp_path, fault_summary):
    urls = ",".join(cluster.urls)
    publisher = Service("fault-publisher", settings_for("fault-publisher", urls, tmp_path / "publisher"))
    counting = CountingConsumer.build(urls, tmp_path / "consumer")
    ledger = make_service("provenance-ledger", urls, tmp_path / "ledger")
    observer = await nats.connect(cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    tally = PublishTally()
    try:
        async with publisher.running(), counting.service.running(), ledger.running():
            js = observer.jetstream()
            before = await js.stream_info(subjects.EVENTS_STREAM)
            assert before.config.num_replicas == 3
            victim = before.cluster.leader  # the hardest member to lose: the stream's leader

            async def publish_all() -> None:
                for i in range(SENT):
                    await tally.publish(publisher, completed_event(i, "cluster"))
                    await asyncio.sleep(0.02)

            publishing = asyncio.create_task(publish_all())
            await eventually(lambda: len(tally.acked) >= KILL_AFTER, 60, f"{KILL_AFTER} events acknowledged")
            await asyncio.to_thread(cluster.kill_server, victim)
            await publishing

            await eventually(lambda: all(counting.calls[e] for e in tally.acked), 60,
                             "the foundation consumer handling every acknowledged event")
            lg = ledger.part(LedgerApp).ledger
            await eventually(lambda: all(in_ledger(lg, e) for e in tally.acked), 60,
                             "the ledger logging every acknowledged event")
            await asyncio.sleep(1.0)  # a redelivery would show up here
            ledger_missing = sum(1 for e in tally.acked if not in_ledger(lg, e))
            for _ in range(100):  # the surviving follower catches up with the new leader
                after = await js.stream_info(subjects.EVENTS_STREAM)
                current = (1 if after.cluster.leader else 0) + sum(1 for r in after.cluster.replicas or [] if r.current)
                if current == 2:
                    break
                await asyncio.sleep(0.2)
            health = {s.name: s.health().status for s in (publisher, counting.service, ledger)}

        lost, duplicated = exactly_once(tally.acked, counting.calls)
        fault_summary(
            "cluster-node-kill",
            sent=SENT,
            answered=len(tally.acked),
            errored=len(tally.failed),
            lost=lost + ledger_missing,
            duplicated=duplicated,
            replicas=after.config.num_replicas,
            current=current,
        )
        assert lost == 0 and ledger_missing == 0 and duplicated == 0
        assert after.cluster.leader != victim
        assert after.config.num_replicas == 3 and current == 2
        assert health == dict.fromkeys(health, "ok")
    finally:
        await observer.close()
