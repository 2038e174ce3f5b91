"""provenance-ledger: appends every event to a verifiable Merkle log."""

from shared import subjects
from shared.config import Settings
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    service = Service("provenance-ledger", settings, description="A tamper-evident log of every event.")
    service.consume(subjects.EVENTS_ALL).on_any(service.log_event)
    return service
