"""The service scaffold's self-description: AsyncAPI from FastStream, OpenAPI from FastAPI."""

from pathlib import Path

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
