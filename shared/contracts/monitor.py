"""monitor's contract: it hears every event, heartbeat and dead letter, and offers HTTP only. Its
entrypoint (services/monitor/entrypoints/app.py) holds events and dead letters back until its state is
rebuilt, then hands each to the Monitor method named here."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Consumes, Contract, Subscription
from shared.events import DeadLetter, EventData, NodeHeartbeat

SERVICE = "monitor"
_MONITOR = "services.monitor.service_layer.monitor:Monitor"

EVENTS = Consumes(SERVICE, subjects.EVENTS_ALL, {EventData: f"{_MONITOR}.on_event"},
                  purpose="every event, into metrics, alerts and the dashboard's state")
DEAD_LETTERS = Consumes("monitor-dead-letters", subjects.DEADLETTER_ALL, {DeadLetter: f"{_MONITOR}.on_dead_letter"},
                        stream=subjects.DEADLETTER_STREAM, purpose="every service's dead letters, counted",
                        registered_by="services.monitor.entrypoints.app:count_dead_letters")
HEARTBEATS = Subscription(
    NodeHeartbeat.subject(), "services.monitor.entrypoints.events:heartbeat", "node telemetry (every monitor hears it)"
)

CONTRACT = Contract(
    SERVICE,
    "Metrics, alerts and the live dashboard.",
    consumes=(EVENTS, DEAD_LETTERS),
    subscriptions=(HEARTBEATS,),
)
