"""One inference is one trace: gateway (HTTP) -> worker (NATS request) -> the inference event -> the
monitor's consumer, all in one process so one in-memory exporter sees every span. The worker also
records the OpenTelemetry GenAI server metrics."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.monitor.service_layer.monitor import Monitor
from services.inference_worker.service_layer import serving
from services.inference_worker.service_layer.telemetry import GenAiMetrics
from services.monitor.entrypoints.app import create_monitor
from shared.telemetry import RecordWhenExported, export_spans
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)
from tests.monitor.conftest import fast_config, until
from tests.support.helpers import make_service, settings_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The process's spans, exported to memory (so recorded: a process records only what it exports)."""
    exporter, recording = InMemorySpanExporter(), RecordWhenExported.exporting
    export_spans(exporter)
    yield exporter
    exporter.shutdown()  # a shut-down exporter drops what later tests' spans would add ...
    RecordWhenExported.exporting = recording  # ... and they go back to recording nothing


@pytest.fixture
def genai(monkeypatch) -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    monkeypatch.setattr(serving, "GENAI", GenAiMetrics(MeterProvider(metric_readers=[reader]).get_meter("test")))
    return reader


async def test_one_inference_is_one_trace_across_gateway_worker_and_monitor(nats_server, tmp_path, ckpts, spans, genai):  # noqa: F811
    bus = await connect_bus(nats_server.url, "node-a")
    monitor = create_monitor(settings_for("monitor", nats_server.url, tmp_path / "monitor"), fast_config())
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    ledger = make_service("provenance-ledger", nats_server.url, tmp_path / "ledger")
    async with monitor.running(), worker.running(), ledger.running():
        await deployed(bus, "tiny")
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
                response = await http.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4}
                )
            assert response.status_code == 200, response.text
        await until(
            lambda: monitor.part(Monitor).state.traffic.count(), "the inference event at the monitor", timeout=30
        )
        await until(
            lambda: any(
                s.name.startswith("evt.inference.completed") and s.kind == trace.SpanKind.CONSUMER
                for s in spans.get_finished_spans()
            ),
            "the monitor's consumer span",
        )
        await until(
            lambda: any(s.name == "ledger append inference.completed" for s in spans.get_finished_spans()),
            "the ledger's append span",
        )
    await bus.nc.close()

    finished = spans.get_finished_spans()
    gateway_span = next(s for s in finished if s.name == "text_completion tiny")
    trace_id = gateway_span.context.trace_id
    # the caller can find its trace: W3C traceparent on the answer, beside its x-request-id
    ctx = gateway_span.context
    assert response.headers["traceparent"] == f"00-{trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert response.headers["x-request-id"]
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    worker_span = next(s for s in in_trace if s.name == "inference tiny")
    assert worker_span.parent is not None  # continued from the gateway's NATS request, not a new root
    consumer = [
        s for s in in_trace if s.name.startswith("evt.inference.completed") and s.kind == trace.SpanKind.CONSUMER
    ]
    assert consumer, f"the monitor's consumer span is not in the gateway's trace: {sorted(names)}"
    # the trace id the worker wrote into the inference event (for the ledger's records) is the same trace
    [completed] = [e.data for e in bus.events if e.type == "inference.completed"]
    assert completed.trace_id == format(trace_id, "032x")

    # the ledger's record of the inference event, in the same trace
    [append] = [s for s in in_trace if s.name == "ledger append inference.completed"]
    assert append.attributes["strata.event_id"] and append.parent is not None

    # the engine's phases, children of the worker's span, one after another
    phases = {s.name: s for s in in_trace if s.name.startswith("engine ")}
    assert set(phases) == {"engine queue", "engine prefill", "engine decode"}, sorted(names)
    assert all(s.parent.span_id == worker_span.context.span_id for s in phases.values())
    queue, prefill, decode = phases["engine queue"], phases["engine prefill"], phases["engine decode"]
    assert queue.start_time <= queue.end_time <= prefill.start_time + 1 and prefill.end_time <= decode.start_time + 1
    assert worker_span.start_time <= queue.start_time and decode.end_time <= worker_span.end_time
    assert decode.attributes["gen_ai.usage.output_tokens"] == 4

    # GenAI conventions on the spans ...
    assert gateway_span.attributes["gen_ai.operation.name"] == "text_completion"
    assert gateway_span.attributes["gen_ai.request.model"] == "tiny"
    assert gateway_span.attributes["gen_ai.usage.output_tokens"] == 4
    assert worker_span.attributes["gen_ai.usage.output_tokens"] == 4
    assert worker_span.attributes["gen_ai.operation.name"] == "text_completion"

    # ... and on the worker's metrics
    data = genai.get_metrics_data()
    points = {m.name: m.data.data_points for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    for name in (
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    ):
        [point] = points[name]
        assert point.count == 1 and point.attributes["gen_ai.request.model"] == "tiny", name
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert usage["output"] == 4 and usage["input"] > 0


async def test_without_an_exporter_nothing_is_recorded_and_the_callers_trace_still_reaches_the_event(
    nats_server, tmp_path, ckpts, monkeypatch
):  # noqa: F811
    """The default (no OTEL_* exporter): spans are not recorded, yet the caller's traceparent still travels
    gateway -> worker, so the inference event names the caller's trace."""
    monkeypatch.setattr(RecordWhenExported, "exporting", False)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    async with worker.running():
        await deployed(bus, "tiny")
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
                response = await http.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": "Once upon", "max_tokens": 2},
                    headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"},
                )
            assert response.status_code == 200, response.text
        await until(lambda: any(e.type == "inference.completed" for e in bus.events), "the inference event", timeout=30)
    await bus.nc.close()
    [completed] = [e.data for e in bus.events if e.type == "inference.completed"]
    assert completed.trace_id == caller_trace == response.headers["traceparent"].split("-")[1]
    assert not trace.get_tracer("probe").start_span("probe").is_recording()
