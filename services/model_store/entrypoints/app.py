"""model-store: signed, content-addressed models and datasets. It reacts to no event."""

from shared.config import Settings
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    return Service("model-store", settings, description="Models and datasets: blobs, manifests, versions, aliases, signatures.")
