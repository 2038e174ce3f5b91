"""The monitor's use cases: fold events, heartbeats and dead letters into the state and the metrics,
evaluate the alert rules and publish their transitions. No NATS here: publishing and reading the
ledger's lag are injected."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from services.monitor.config import MonitorConfig
from services.monitor.domain.alerts import AlertEngine, Rule, Transition
from services.monitor.domain.metrics import Metrics
from services.monitor.domain.state import FleetState
from services.monitor.service_layer.views import RuleView, Snapshot, rules_view, snapshot
from shared.events import AlertFiring, AlertResolved, DeadLetter, Event, EventData, NodeHeartbeat

log = logging.getLogger(__name__)
Publish = Callable[[EventData], Awaitable[object]]
Clock = Callable[[], float]


class Monitor:
    def __init__(self, config: MonitorConfig, rules: list[Rule], publish: Publish, clock: Clock = time.time) -> None:
        self.config, self.publish, self.clock = config, publish, clock
        self.state = FleetState()
        self.alerts = AlertEngine(rules)
        self.metrics = Metrics(self.state, self.alerts.firing)
        self.version = 0  # bumped on every change, so the SSE stream sends only news

    # -- input -----------------------------------------------------------------------------
    async def on_event(self, event: Event) -> None:
        self.state.apply(event)
        self.metrics.observe(event)
        self.version += 1

    async def on_heartbeat(self, beat: NodeHeartbeat) -> None:
        self.state.heartbeat(beat, self.clock())
        self.version += 1

    async def on_dead_letter(self, letter: DeadLetter) -> None:
        self.state.dead_letter(letter)
        self.metrics.dead_letter(letter)
        self.version += 1

    def set_ledger_lag(self, lag: int | None) -> None:
        if lag != self.state.ledger.lag:
            self.state.ledger.lag = lag
            self.version += 1

    # -- alerts ----------------------------------------------------------------------------
    async def evaluate(self) -> list[Transition]:
        """Evaluate every rule now and publish each transition (firing or resolved) as an event."""
        now = self.clock()
        transitions = self.alerts.evaluate(self.state, now)
        published = []
        for t in transitions:
            labels = dict(t.instance.labels)
            try:
                if t.firing:
                    await self.publish(AlertFiring(rule=t.rule.name, severity=t.rule.severity, summary=t.instance.summary,
                                                   labels=labels, value=t.instance.value))
                else:
                    await self.publish(AlertResolved(rule=t.rule.name, labels=labels))
            except Exception as exc:  # NATS away: the next evaluation tries again, no transition is lost
                log.warning("alert %s %s not published, will retry: %s", t.rule.name, labels, exc)
                self.alerts.undo(t, now)
                continue
            published.append(t)
            self.metrics.alert_transitions.labels(t.rule.name, "firing" if t.firing else "resolved").inc()
            log.log(logging.WARNING if t.firing else logging.INFO, "alert %s %s %s: %s", t.rule.name,
                    "FIRING" if t.firing else "resolved", labels, t.instance.summary)
        if published:
            self.version += 1
        return published

    # -- output ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return snapshot(self.state, self.alerts, self.clock(), self.config.history_s, self.config.bucket_s)

    def rules(self) -> list[RuleView]:
        return rules_view(self.alerts)
