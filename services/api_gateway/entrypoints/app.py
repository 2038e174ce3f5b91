"""api-gateway: the OpenAI-compatible HTTP edge. It owns nothing durable and consumes no events."""

from shared.config import Settings
from shared.service import Service


def create_service(settings: Settings | None = None) -> Service:
    return Service("api-gateway", settings, description="OpenAI-compatible HTTP API in front of the workers.")
