"""model-store's own figures at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class BlobTraffic:
    """Blob bytes uploaded (``in``) and served (``out``)."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.service = service
        self.bytes = Counter("strata_model_store_blob_bytes", "Blob bytes uploaded (in) and served (out)",
                             ["service", "direction"], registry=registry)

    def count(self, direction: str, n: int) -> None:
        self.bytes.labels(self.service, direction).inc(n)
