"""Every service's own Prometheus metrics, served at its ``GET /metrics``: HTTP requests by route and
status, RPC calls by op and outcome, and its event consumer's counts; a service adds its own on
``registry`` (model-store's pushes, the ledger's tree size, ...). Names follow Prometheus'
conventions (``strata_<what>_<unit>``, counters end in ``_total``); the monitor's fleet metrics keep
vLLM's ``strata:`` names and are served beside these.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.rpc import RpcReply

Read = Callable[[], Iterable[tuple[list[str], float]]]  # (label values, value) pairs
# seconds: from a health check to a model push
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self._others: list[CollectorRegistry] = []
        r = self.registry
        self.http_requests = Counter("strata_http_requests", "HTTP requests answered",
                                     ["service", "route", "method", "status"], registry=r)
        self.http_seconds = Histogram("strata_http_request_duration_seconds", "HTTP request duration, to the "
                                      "end of the response body", ["service", "route", "method"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.rpc_requests = Counter("strata_rpc_requests", "NATS RPC requests answered, by outcome (ok or the "
                                    "error code)", ["service", "op", "outcome"], registry=r)
        self.rpc_seconds = Histogram("strata_rpc_duration_seconds", "NATS RPC handling time", ["service", "op"],
                                     buckets=LATENCY_BUCKETS, registry=r)

    def include(self, registry: CollectorRegistry) -> None:
        """Serve another registry's metrics at the same /metrics (the monitor's fleet metrics)."""
        self._others.append(registry)

    def gauges(self, name: str, documentation: str, labels: list[str], read: Read) -> None:
        """A gauge computed on every scrape: ``read`` yields (label values, value) pairs."""
        self._computed(GaugeMetricFamily, name, documentation, labels, read)

    def counters(self, name: str, documentation: str, labels: list[str], read: Read) -> None:
        """A counter kept elsewhere (the consumer's stats), read on every scrape."""
        self._computed(CounterMetricFamily, name, documentation, labels, read)

    def _computed(self, family, name: str, documentation: str, labels: list[str], read: Read) -> None:
        self.registry.register(_Computed(family, name, documentation, ["service", *labels],
                                         lambda: (([self.service, *values], v) for values, v in read())))

    def rpc(self, op: str, reply: bytes, seconds: float) -> None:
        answer = RpcReply.model_validate_json(reply)
        outcome = "ok" if answer.ok else (answer.error.code if answer.error else "error")
        self.rpc_requests.labels(self.service, op, outcome).inc()
        self.rpc_seconds.labels(self.service, op).observe(seconds)

    def exposition(self) -> bytes:
        return b"".join(generate_latest(r) for r in (self.registry, *self._others))


class _Computed(Collector):
    def __init__(self, family, name: str, documentation: str, labels: list[str], read) -> None:
        self.family, self.name, self.documentation, self.labels, self.read = family, name, documentation, labels, read

    def collect(self):
        metric = self.family(self.name, self.documentation, labels=self.labels)
        for values, value in self.read():
            metric.add_metric(values, value)
        yield metric


class HttpMetrics:
    """ASGI middleware: counts each request by its route's template (``/v1/models/{model_id}``, not
    the id: one series per route, however many ids), method and status, and times it to the end of
    its body. Plain ASGI, so it costs a few microseconds, not a task per request."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            m, method = self.metrics, scope["method"]
            m.http_requests.labels(m.service, route, method, str(status)).inc()
            m.http_seconds.labels(m.service, route, method).observe(time.perf_counter() - started)
