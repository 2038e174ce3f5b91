"""Every service serves its own Prometheus metrics at GET /metrics: HTTP requests by route template
and status, RPC requests by op and outcome, and its consumer's event counts. Real nats-server, real
uvicorn, the exposition parsed by prometheus_client."""
from __future__ import annotations

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import errors, rpc, subjects
from shared.config import SERVICES
from shared.service import load
from tests.foundation.test_rpc import Found, Lookup, lookup_service
from tests.support.helpers import settings_for
from tests.support.live import serve_on_loop


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_http_rpc_and_event_counts_at_metrics(nats_server, tmp_path):
    service = lookup_service(nats_server.url, tmp_path)
    subject = subjects.rpc("model-store", "lookup")
    async with service.running(), serve_on_loop(service.http) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            for path, status in (("/lookup/tiny", 200), ("/lookup/a", 200), ("/lookup/missing", 404),
                                 ("/no/such/route", 404)):
                assert (await http.get(path)).status_code == status
            nc = await nats.connect(nats_server.url)
            try:
                await rpc.call(nc, subject, Lookup(name="tiny"), Found)
                with pytest.raises(errors.NotFound):
                    await rpc.call(nc, subject, Lookup(name="missing"), Found)
                await nc.request(subject, b'{"nom": 1}', timeout=5)
            finally:
                await nc.close()
            response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return m[(name, frozenset({"service": "model-store", **labels}.items()))]

    route = "/lookup/{name}"  # the template: one series however many names are looked up
    assert value("strata_http_requests_total", route=route, method="GET", status="200") == 2
    assert value("strata_http_requests_total", route=route, method="GET", status="404") == 1
    assert value("strata_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value("strata_http_request_duration_seconds_count", route=route, method="GET") == 3
    assert value("strata_rpc_requests_total", op="lookup", outcome="ok") == 1
    assert value("strata_rpc_requests_total", op="lookup", outcome="not_found") == 1
    assert value("strata_rpc_requests_total", op="lookup", outcome="invalid") == 1
    assert value("strata_rpc_duration_seconds_count", op="lookup") == 3
    assert value("strata_events_total", outcome="handled") == 0  # this one consumes nothing


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_serves_metrics(name, tmp_path):
    service = load(name, settings_for(name, "nats://127.0.0.1:1", tmp_path))
    assert "/metrics" in service.http.openapi()["paths"]
    names = {f.name for f in text_string_to_metric_families(service.metrics.exposition().decode())}
    assert {"strata_http_requests", "strata_rpc_requests", "strata_events"} <= names, names
