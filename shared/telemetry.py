"""OpenTelemetry set-up shared by every service, driven by the standard ``OTEL_*`` variables.

Spans are always recorded (so the trace context travels in NATS headers from service to service);
they are exported only where an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (needs the
``opentelemetry-exporter-otlp`` package) or ``OTEL_TRACES_EXPORTER=console``. Metrics (the GenAI
histograms) likewise: a MeterProvider always, a reader only with an OTLP endpoint or
``OTEL_METRICS_EXPORTER=console``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger(__name__)


def setup_tracing(service: str, node: str) -> TracerProvider:
    setup_metrics(service, node)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # already set in this process (tests run several services)
        return current
    provider = TracerProvider(resource=_resource(service, node))
    exporter = _exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


# Per signal: the console exporter, and the OTLP exporter's module and class (an optional package).
_EXPORTERS = {
    "traces": (ConsoleSpanExporter, "opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter"),
    "metrics": (ConsoleMetricExporter, "opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter"),
}


def _exporter(signal: str = "traces") -> Any:
    """The exporter the standard OTEL_* variables ask for, or None: nothing is exported by default."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    console, module, name = _EXPORTERS[signal]
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER") == "console":
        return console()
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"):
        try:
            return getattr(importlib.import_module(module), name)()
        except ImportError:
            log.warning("an OTLP endpoint is set but opentelemetry-exporter-otlp is not installed")
    return None


def setup_metrics(service: str, node: str) -> MeterProvider:
    current = metrics.get_meter_provider()
    if isinstance(current, MeterProvider):  # already set in this process
        return current
    exporter = _exporter("metrics")
    readers = [PeriodicExportingMetricReader(exporter)] if exporter is not None else []
    provider = MeterProvider(resource=_resource(service, node), metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider


def _resource(service: str, node: str) -> Resource:
    return Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"strata-{service}"), "service.instance.id": node}
    )
