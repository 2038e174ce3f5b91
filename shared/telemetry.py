"""OpenTelemetry set-up shared by every service, driven by the standard ``OTEL_*`` variables.

Spans are always recorded (so the trace context travels in NATS headers from service to service);
they are exported only where an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (needs the
``opentelemetry-exporter-otlp`` package) or ``OTEL_TRACES_EXPORTER=console``.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)


def setup_tracing(service: str, node: str) -> TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # already set in this process (tests run several services)
        return current
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"strata-{service}"), "service.instance.id": node}
    )
    provider = TracerProvider(resource=resource)
    exporter = _exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter() -> SpanExporter | None:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER") == "console":
        return ConsoleSpanExporter()
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed")
            return None
        return OTLPSpanExporter()
    return None
