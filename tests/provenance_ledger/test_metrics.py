"""The ledger's own figures at its /metrics (real nats-server, real uvicorn): tree size, leaves by
outcome, and the verify state, next to every service's HTTP/RPC/event counts."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared.events import DeployRequested, Source, make_event
from tests.provenance_ledger.conftest import NODE, ledger_of, wait_ingested
from tests.support.live import serve_on_loop


async def test_ledger_metrics_follow_the_log(ledger_service, js):
    src = Source(service="client", node=NODE)
    events = [make_event(DeployRequested(deployment_id=f"dep-{i}", model_ref="tiny:1"), src) for i in range(3)]
    async with ledger_service.running(), serve_on_loop(ledger_service.http) as url:
        for e in events:
            await js.publish(e.subject, e.to_bytes(), headers={"Nats-Msg-Id": e.id})
        await wait_ingested(ledger_service, {e.id for e in events})
        ledger = ledger_of(ledger_service)
        before = ledger.size, ledger.stats.appended  # checkpoints keep appending: bracket the scrape
        async with httpx.AsyncClient(base_url=url) as http:
            text = (await http.get("/metrics")).text
        after = ledger.size, ledger.stats.appended
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    svc = ("service", "provenance-ledger")
    assert 3 <= before[0] <= got[("strata_ledger_tree_size", (svc,))] <= after[0]
    assert 3 <= before[1] <= got[("strata_ledger_leaves_total", (("outcome", "appended"), svc))] <= after[1]
    assert got[("strata_ledger_tamper_suspected", (svc,))] == 0
    assert ("strata_ledger_ingest_failures_total", (svc,)) in got
