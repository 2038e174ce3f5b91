"""inference-worker: loads the models scheduled on its node and serves them."""

from shared.config import Settings
from shared.events import DeployScheduled, UndeployRequested
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    service = Service("inference-worker", settings, description="Loads models on this node and serves them.")
    # Every worker must see every deploy event, so each node has a durable of its own.
    consumer = service.consume("evt.deploy.>", durable=f"inference-worker-{service.settings.node_id}")
    for event_type in (DeployScheduled, UndeployRequested):
        consumer.on(event_type)(service.log_event)
    return service
