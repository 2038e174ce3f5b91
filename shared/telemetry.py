"""OpenTelemetry set-up shared by every service, driven by the standard ``OTEL_*`` variables.

Spans are exported where an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (needs the
``opentelemetry-exporter-otlp`` package) or ``OTEL_TRACES_EXPORTER=console`` (or in a test,
``export_spans``). A process records spans only while it exports them (``RecordWhenExported``); the
trace context travels in HTTP and NATS headers either way, so a process that does export still joins
the whole trace. ``OTEL_TRACES_SAMPLER``, when set, overrides that choice. Metrics (the GenAI histograms,
FastAPI's HTTP metrics) likewise: an SDK MeterProvider only with an OTLP endpoint or
``OTEL_METRICS_EXPORTER=console``; otherwise the API's no-op meters.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import get_current_span
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class RecordWhenExported(Sampler):
    """Record a span only while this process exports spans. A recorded span that no exporter takes is
    built and thrown away: FastAPI's server span alone cost the api-gateway's app ~0.06 ms of its ~0.3 ms
    of CPU per request (bench/gateway_app.py, docs/benchmarks.md §1). A dropped span still
    has its trace id and span id, which travel in the traceparent header; ``inference.completed`` events
    still carry the trace id. Not parent-based: a process that exports records its spans even when its
    caller did not record (its parent span is then simply missing from the exported trace)."""

    exporting = False  # set by export_spans (setup_tracing calls it when an OTEL_* exporter is configured)

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None) -> SamplingResult:
        parent_state = get_current_span(parent_context).get_span_context().trace_state
        if RecordWhenExported.exporting:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent_state)
        return SamplingResult(Decision.DROP, None, parent_state)

    def get_description(self) -> str:
        return "RecordWhenExported"


_sampler_from_env = False  # OTEL_TRACES_SAMPLER chose the sampler (setup_tracing)


def recording_spans() -> bool:
    """Whether this process may record spans: it exports them, or OTEL_TRACES_SAMPLER decides."""
    return RecordWhenExported.exporting or _sampler_from_env


def skip_http_telemetry(_scope: Scope) -> bool:
    """FastAPI's ``telemetry["exclude"]``: skip its per-request telemetry while no span is recorded. Its
    server span, even unrecorded, and the wrapping around it were a third of the api-gateway's app's CPU
    per request (0.147 -> 0.105 ms, bench/gateway_app.py). ``TraceContext`` keeps the caller's trace meanwhile."""
    return not recording_spans()


class TraceContext:
    """ASGI middleware: while FastAPI's telemetry is skipped (``skip_http_telemetry``), make the caller's
    trace context (``traceparent``) current for the request anyway, so the next hop (a NATS request, an
    event) continues the caller's trace, as it does when FastAPI's server span is there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or recording_spans():
            await self.app(scope, receive, send)
            return
        token = otel_context.attach(propagate.extract(Headers(scope=scope)))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


def setup_tracing(service: str, node: str) -> TracerProvider:
    setup_metrics(service, node)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # already set in this process (tests run several services)
        return current
    # OTEL_TRACES_SAMPLER set: the SDK reads it (sampler=None), e.g. to measure what recording costs.
    global _sampler_from_env
    _sampler_from_env = bool(os.environ.get("OTEL_TRACES_SAMPLER"))
    sampler = None if _sampler_from_env else RecordWhenExported()
    provider = TracerProvider(resource=_resource(service, node), sampler=sampler)
    trace.set_tracer_provider(provider)
    exporter = _exporter()
    if exporter is not None:
        export_spans(exporter, batch=True)
    return provider


def export_spans(exporter: SpanExporter, *, batch: bool = False) -> TracerProvider:
    """Send this process's spans to ``exporter`` from now on (and so record them)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=RecordWhenExported())
        trace.set_tracer_provider(provider)
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    RecordWhenExported.exporting = True
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


def setup_metrics(service: str, node: str) -> MeterProvider | None:
    """The SDK MeterProvider with an exporting reader, or None (the API's no-op meters stay): a
    measurement no reader collects cost the worker six histogram records per request for nothing."""
    current = metrics.get_meter_provider()
    if isinstance(current, MeterProvider):  # already set in this process
        return current
    exporter = _exporter("metrics")
    if exporter is None:
        return None
    provider = MeterProvider(
        resource=_resource(service, node), metric_readers=[PeriodicExportingMetricReader(exporter)]
    )
    metrics.set_meter_provider(provider)
    return provider


def metrics_exported() -> bool:
    return isinstance(metrics.get_meter_provider(), MeterProvider)


def _resource(service: str, node: str) -> Resource:
    return Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"strata-{service}"), "service.instance.id": node}
    )
