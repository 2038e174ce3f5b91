"""monitor: turns every event into metrics, alerts and the dashboard."""

from shared import subjects
from shared.config import Settings
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    service = Service("monitor", settings, description="Metrics, alerts and the live dashboard.")
    service.consume(subjects.EVENTS_ALL).on_any(service.log_event)
    return service
