"""monitor's contract: it hears every event, heartbeat and dead letter, and offers HTTP only."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Consumes, Contract, Subscription
from shared.events import DeadLetter, EventData, NodeHeartbeat

SERVICE = "monitor"
_APP = "services.monitor.entrypoints.app"

EVENTS = Consumes(SERVICE, subjects.EVENTS_ALL, {EventData: f"{_APP}:on_event"},
                  purpose="every event, into metrics, alerts and the dashboard's state")
DEAD_LETTERS = Consumes("monitor-dead-letters", subjects.DEADLETTER_ALL, {DeadLetter: f"{_APP}:count_dead_letters"},
                        stream=subjects.DEADLETTER_STREAM, purpose="every service's dead letters, counted")
HEARTBEATS = Subscription(NodeHeartbeat.subject(), f"{_APP}:on_heartbeat", "node telemetry (every monitor hears it)")

CONTRACT = Contract(
    SERVICE, "Metrics, alerts and the live dashboard.",
    consumes=(EVENTS, DEAD_LETTERS),
    subscriptions=(HEARTBEATS,),
)
