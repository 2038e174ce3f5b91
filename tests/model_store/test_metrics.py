"""model-store's /metrics (real nats-server, real uvicorn): blob bytes in and out, and pushes and
pulls by route and status from the service-wide HTTP counts."""
from __future__ import annotations

import hashlib

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def test_blob_bytes_and_pushes_are_counted(live_store):
    blob = b"weights " * 5000
    digest = hashlib.sha256(blob).hexdigest()
    async with httpx.AsyncClient(base_url=live_store.url) as http:
        assert (await http.put(f"/v1/blobs/{digest}", content=blob)).status_code == 200
        for _ in range(2):
            assert (await http.get(f"/v1/blobs/{digest}")).content == blob
        assert (await http.get(f"/v1/blobs/{'0' * 64}")).status_code == 404
        text = (await http.get("/metrics")).text
    got = {(s.name, frozenset(s.labels.items())): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset({"service": "model-store", **labels}.items()))]

    assert value("strata_model_store_blob_bytes_total", direction="in") == len(blob)
    assert value("strata_model_store_blob_bytes_total", direction="out") == 2 * len(blob)
    route = "/v1/blobs/{sha256}"
    assert value("strata_http_requests_total", route=route, method="PUT", status="200") == 1
    assert value("strata_http_requests_total", route=route, method="GET", status="200") == 2
    assert value("strata_http_requests_total", route=route, method="GET", status="404") == 1
