"""The service scaffold's self-description: AsyncAPI from FastStream, OpenAPI from FastAPI."""

from pathlib import Path

from opentelemetry import trace

from shared.events import EventData
from shared.service import load
from tests.support.helpers import settings_for


def test_each_service_documents_the_events_it_publishes_as_asyncapi(tmp_path: Path):
    service = load("hardware-inventory", settings_for("hardware-inventory", "nats://127.0.0.1:1", tmp_path))
    doc = service.asyncapi()
    assert doc["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in doc["channels"].values()}
    own = {cls.subject() for cls in EventData.registry.values() if cls.PUBLISHER == "hardware-inventory"}
    assert own <= addresses and "evt.deploy.ready" not in addresses
    assert "rpc.hardware-inventory.health" in addresses
    schemas = doc["components"]["schemas"]
    assert any("NodeRegistered" in name for name in schemas), sorted(schemas)


def test_each_service_has_openapi_with_its_health_route(tmp_path: Path):
    service = load("model-store", settings_for("model-store", "nats://127.0.0.1:1", tmp_path))
    spec = service.http.openapi()
    assert spec["info"]["title"] == "Strata model-store"
    assert "/healthz" in spec["paths"] and "/asyncapi.json" in spec["paths"]


def test_spans_are_recorded_only_while_exported_and_the_trace_travels_either_way(monkeypatch):
    from opentelemetry import propagate
    from opentelemetry.sdk.trace import TracerProvider

    from shared.telemetry import RecordWhenExported

    tracer = TracerProvider(sampler=RecordWhenExported()).get_tracer("test")
    remote = propagate.extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    monkeypatch.setattr(RecordWhenExported, "exporting", False)
    dropped = tracer.start_span("dropped", context=remote)
    assert not dropped.is_recording()
    assert format(dropped.get_span_context().trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(dropped))
    assert carrier["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")  # the next hop joins the trace
    monkeypatch.setattr(RecordWhenExported, "exporting", True)
    recorded = tracer.start_span("recorded", context=remote)
    assert recorded.is_recording() and recorded.get_span_context().trace_id == dropped.get_span_context().trace_id


def test_telemetry_exports_only_what_the_otel_variables_ask_for(monkeypatch, caplog):
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from shared import telemetry

    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert telemetry._exporter("traces") is None and telemetry._exporter("metrics") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    assert isinstance(telemetry._exporter("traces"), ConsoleSpanExporter)
    assert isinstance(telemetry._exporter("metrics"), ConsoleMetricExporter)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert telemetry._exporter("traces") is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert telemetry._exporter("traces") is None  # the OTLP package is not installed here: said, not crashed
    assert "opentelemetry-exporter-otlp is not installed" in caplog.text


async def test_an_unexpected_exception_in_a_route_answers_the_typed_json_error_not_a_bare_page(tmp_path: Path):
    """#20 item 3: a 102 MB push answered Starlette's text "Internal Server Error"; every error is JSON now."""
    import httpx

    service = load("model-store", settings_for("model-store", "nats://127.0.0.1:1", tmp_path))

    @service.http.get("/boom")
    async def boom() -> None:
        raise OSError(28, "No space left on device", "/secret/path")

    transport = httpx.ASGITransport(app=service.http, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"code": "internal",
                                  "message": "internal error in model-store (OSError); its log has the details"}}
