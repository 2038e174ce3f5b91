"""What the monitor does with the core messages it hears (shared/contracts/monitor.py names each
handler here): parse, then call the started Monitor. Each takes the service first; Service binds it."""

from __future__ import annotations

import logging

from faststream.nats.annotations import NatsMessage

from services.monitor.service_layer.monitor import Monitor
from shared.events import parse_event
from shared.service import Service

log = logging.getLogger(__name__)


async def heartbeat(service: Service, msg: NatsMessage) -> None:
    try:
        event = parse_event(msg.raw_message.data, msg.raw_message.subject)
    except Exception as exc:
        log.warning("malformed heartbeat ignored: %s", exc)
        return
    await service.part(Monitor).on_heartbeat(event.data)  # type: ignore[arg-type]
