"""hardware-inventory: nodes, devices, the memory-fit model, and placement of deployments."""

from shared.config import Settings
from shared.events import DeployFailed, DeployReady, DeployRequested, DeployUnloaded, UndeployRequested
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    service = Service("hardware-inventory", settings, description="Nodes, devices, memory fit and placement.")
    consumer = service.consume("evt.deploy.>")
    for event_type in (DeployRequested, UndeployRequested, DeployReady, DeployFailed, DeployUnloaded):
        consumer.on(event_type)(service.log_event)
    return service
