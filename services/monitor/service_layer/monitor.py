"""The monitor's use cases: fold events, heartbeats and dead letters into the state and the metrics,
evaluate the alert rules and publish their transitions. No NATS here: publishing and reading the
ledger's lag are injected."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

from services.monitor.adapters.replay import ReplayPass, ReplayProgress
from services.monitor.config import MonitorConfig
from services.monitor.domain.alerts import AlertEngine, Rule, Transition
from services.monitor.adapters.metrics import Metrics
from services.monitor.domain.state import FleetState
from services.monitor.domain.traffic import Traffic
from services.monitor.service_layer.views import RuleView, Snapshot, rules_view, snapshot
from shared.events import (
    AlertFiring, AlertResolved, DeadLetter, Event, EventData, InferenceCompleted, InferenceFailed, NodeHeartbeat,
)

log = logging.getLogger(__name__)
Publish = Callable[[EventData], Awaitable[object]]
Clock = Callable[[], float]
# The high-volume events: only the state's request windows read them, so a restart replays only the
# window's worth (every other event type is rare and replayed from the beginning of the stream).
REQUEST_EVENTS: tuple[type[EventData], ...] = (InferenceCompleted, InferenceFailed)
REQUEST_RULE_KINDS = ("latency_p95", "error_rate")  # the alert rules that read the request windows
# The stream stamps a message when it stores it; the window is in the publisher's event time, which a
# skewed clock can put ahead: replaying this much further back keeps such a request in the window.
CLOCK_SKEW_S = 60.0


class Monitor:
    def __init__(self, config: MonitorConfig, rules: list[Rule], publish: Publish, clock: Clock = time.time) -> None:
        self.config, self.publish, self.clock = config, publish, clock
        self.alerts = AlertEngine(rules)
        self.state = FleetState(traffic=Traffic(self.requests_window_s() + CLOCK_SKEW_S, clock))
        self.metrics = Metrics(self.state, self.alerts.firing)
        self.version = 0  # bumped on every change, so the SSE stream sends only news
        self.replay_progress = ReplayProgress()
        self.dead_letter_replay = ReplayProgress()  # the same, for the DEADLETTER stream
        self._pushed: tuple[int, str] | None = None  # (push tick, snapshot JSON): see pushed_snapshot

    # -- input -----------------------------------------------------------------------------
    async def on_event(self, event: Event) -> None:
        self.state.apply(event)
        self.metrics.observe(event)
        self.version += 1

    def replay(self, event: Event) -> None:
        """An event the previous process already handled, read back on start: the state only. The
        Prometheus counters start at zero in a new process, as Prometheus expects of a restart;
        counting the replayed events again would show a spike of requests that were already counted.
        The alerts this monitor published are taken back too, so a restart does not fire them again."""
        self.state.apply(event)
        match event.data:
            case AlertFiring() as f:
                self.alerts.restore(f.rule, f.labels, True, f.value, f.summary, event.time.timestamp())
            case AlertResolved() as r:
                self.alerts.restore(r.rule, r.labels, False, None, "", event.time.timestamp())
        self.version += 1

    def replay_plan(self) -> list[ReplayPass]:
        """What a restart reads back. Deployments, nodes and the ledger are folded from every event
        since the beginning (they are few, and a deployment made a week ago is still on the
        dashboard); requests only for the longest window anything reads them in (the charts, the
        request-based alert rules), read with a time-filtered consumer so that the server skips the
        older ones instead of sending the whole history over the wire to be dropped here."""
        request_subjects = {cls.subject() for cls in REQUEST_EVENTS}
        rare = sorted(cls.subject() for cls in EventData.registry.values() if cls.PERSISTENT)
        since = datetime.fromtimestamp(self.clock(), timezone.utc) - timedelta(
            seconds=self.requests_window_s() + CLOCK_SKEW_S
        )
        return [ReplayPass([s for s in rare if s not in request_subjects]), ReplayPass(sorted(request_subjects), since)]

    def requests_window_s(self) -> float:
        windows = [r.window_s for r in self.alerts.rules if r.kind in REQUEST_RULE_KINDS]
        return max([self.config.history_s, *windows])

    def replayed(self) -> None:
        """The replay is over: heartbeats are not in the stream, so the silence of a replayed node is
        counted from now, not from its registration (else every restart would report it lost)."""
        self.state.restart_heartbeat_clocks(self.clock())
        self.version += 1

    async def on_heartbeat(self, beat: NodeHeartbeat) -> None:
        self.state.heartbeat(beat, self.clock())
        self.version += 1

    async def on_dead_letter(self, letter: DeadLetter) -> None:
        self.state.dead_letter(letter)
        self.metrics.dead_letter(letter)
        self.version += 1

    def replay_dead_letter(self, letter: DeadLetter) -> None:
        """A dead letter the previous process already counted, read back on start: the totals and the
        dead-letter alert's window, not the Prometheus counter (it starts at zero, as on any restart)."""
        self.state.dead_letter(letter)
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
                    await self.publish(
                        AlertFiring(
                            rule=t.rule.name,
                            severity=t.rule.severity,
                            summary=t.instance.summary,
                            labels=labels,
                            value=t.instance.value,
                        )
                    )
                else:
                    await self.publish(AlertResolved(rule=t.rule.name, labels=labels))
            except Exception as exc:  # NATS away: the next evaluation tries again, no transition is lost
                log.warning("alert %s %s not published, will retry: %s", t.rule.name, labels, exc)
                self.alerts.undo(t, now)
                continue
            published.append(t)
            self.metrics.alert_transitions.labels(t.rule.name, "firing" if t.firing else "resolved").inc()
            log.log(
                logging.WARNING if t.firing else logging.INFO,
                "alert %s %s %s: %s",
                t.rule.name,
                "FIRING" if t.firing else "resolved",
                labels,
                t.instance.summary,
            )
        if published:
            self.version += 1
        return published

    # -- output ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return snapshot(
            self.state,
            self.alerts,
            self.clock(),
            self.config.history_s,
            self.config.bucket_s,
            self.replay_progress,
            self.dead_letter_replay,
        )

    def pushed_snapshot(self) -> str:
        """The dashboard stream's snapshot as JSON, built once per push interval however many dashboards
        are watching (15-19 ms each at 2,000 req/s, bench/monitor_windows.py); at most one interval old."""
        tick = math.floor(self.clock() / self.config.push_every_s)
        if self._pushed is None or self._pushed[0] != tick:
            self._pushed = (tick, self.snapshot().model_dump_json())
        return self._pushed[1]

    def rules(self) -> list[RuleView]:
        return rules_view(self.alerts)
