"""The Prometheus exposition: counters and histograms fed per event, gauges read from the fleet state
at scrape time (so they can never drift from what the dashboard shows).

Names follow vLLM's (``vllm:e2e_request_latency_seconds`` ...) with the prefix ``strata:`` and the
same ``model_name`` label, so a vLLM dashboard or alert ports by swapping the prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.monitor.domain.alerts import Active, Rule
from services.monitor.domain.state import FleetState, model_name
from shared.events import DeadLetter, Event, InferenceCompleted, InferenceFailed, TamperDetected

P = "strata:"
# vLLM's buckets, so that the histograms of both systems can be compared bucket by bucket.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class Metrics:
    """One registry per monitor, so that several monitors in one test process do not collide."""

    def __init__(self, state: FleetState, firing: Callable[[], list[tuple[Rule, Active]]] = list) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter(
            f"{P}request_success",
            "Requests that finished, by finish reason",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.failure = Counter(f"{P}request_failure", "Requests that failed", ["model_name"], registry=r)
        self.prompt_tokens = Counter(f"{P}prompt_tokens", "Prompt tokens processed", ["model_name"], registry=r)
        self.generation_tokens = Counter(f"{P}generation_tokens", "Tokens generated", ["model_name"], registry=r)
        self.ttft = Histogram(
            f"{P}time_to_first_token_seconds", "Time to first token", ["model_name"], buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            f"{P}time_per_output_token_seconds",
            "Time per output token",
            ["model_name"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{P}e2e_request_latency_seconds",
            "End-to-end request latency",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            f"{P}request_queue_time_seconds",
            "Time a request waited before it ran",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events = Counter(f"{P}events", "Events consumed from the EVENTS stream, by type", ["type"], registry=r)
        self.dead_letters = Counter(
            f"{P}dead_letters", "Messages dead-lettered, by the service that gave up", ["service"], registry=r
        )
        self.tamper = Counter(f"{P}ledger_tamper_detected", "Ledger verification failures", registry=r)
        self.alert_transitions = Counter(
            f"{P}alert_transitions", "Alerts fired and resolved", ["rule", "to"], registry=r
        )
        r.register(_StateCollector(state, firing))

    def observe(self, event: Event) -> None:
        self.events.labels(event.type).inc()
        data = event.data
        if isinstance(data, InferenceCompleted):
            m = data.model.name
            self.success.labels(m, data.finish_reason).inc()
            self.prompt_tokens.labels(m).inc(data.prompt_tokens)
            self.generation_tokens.labels(m).inc(data.completion_tokens)
            self.ttft.labels(m).observe(data.time_to_first_token_seconds)
            self.tpot.labels(m).observe(data.time_per_output_token_seconds)
            self.e2e.labels(m).observe(data.e2e_seconds)
            self.queue.labels(m).observe(data.queue_seconds)
        elif isinstance(data, InferenceFailed):
            self.failure.labels(model_name(data.model_ref)).inc()
        elif isinstance(data, TamperDetected):
            self.tamper.inc()

    def dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.labels(letter.service).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges computed from the fleet state on every scrape."""

    def __init__(self, state: FleetState, firing: Callable[[], list[tuple[Rule, Active]]]) -> None:
        self.state, self.firing = state, firing

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s, now = self.state, time.time()
        deployments = GaugeMetricFamily(
            f"{P}deployments", "Deployments by model and state", labels=["model_name", "state"]
        )
        for (model, state), n in sorted(s.deployments_by_state().items()):
            deployments.add_metric([model, state], n)
        yield deployments

        up = GaugeMetricFamily(f"{P}node_up", "1 while the node sends heartbeats, 0 once it is lost", labels=["node"])
        seen = GaugeMetricFamily(
            f"{P}node_last_seen_seconds", "Seconds since the node's last heartbeat", labels=["node"]
        )
        ram = GaugeMetricFamily(f"{P}node_ram_free_bytes", "Free RAM on the node", labels=["node"])
        total = GaugeMetricFamily(
            f"{P}device_memory_total_bytes", "Memory of each device", labels=["node", "device", "kind"]
        )
        free = GaugeMetricFamily(
            f"{P}device_memory_free_bytes", "Free memory of each device", labels=["node", "device", "kind"]
        )
        util = GaugeMetricFamily(
            f"{P}device_utilisation_ratio", "Utilisation of each device (0..1)", labels=["node", "device"]
        )
        for node in sorted(s.nodes.values(), key=lambda n: n.node_id):
            up.add_metric([node.node_id], 0 if node.lost else 1)
            seen.add_metric([node.node_id], max(0.0, now - node.last_seen) if node.last_seen else float("nan"))
            ram.add_metric([node.node_id], node.ram_free)
            for device in node.devices.values():
                total.add_metric([node.node_id, device.id, device.kind], device.memory_total)
                free.add_metric([node.node_id, device.id, device.kind], device.memory_free)
            for device_id, value in sorted(node.utilisation.items()):
                util.add_metric([node.node_id, device_id], value)
        yield from (up, seen, ram, total, free, util)

        ledger = s.ledger
        size = GaugeMetricFamily(f"{P}ledger_tree_size", "Leaves in the ledger's latest signed tree head")
        lag = GaugeMetricFamily(f"{P}ledger_lag_events", "Events in EVENTS the ledger has not appended yet")
        age = GaugeMetricFamily(f"{P}ledger_checkpoint_age_seconds", "Seconds since the latest signed tree head")
        if ledger.tree_size is not None:
            size.add_metric([], ledger.tree_size)
        if ledger.lag is not None:
            lag.add_metric([], ledger.lag)
        if ledger.signed_at is not None:
            age.add_metric([], max(0.0, now - ledger.signed_at))
        yield from (size, lag, age)

        alerts = GaugeMetricFamily(
            f"{P}alerts_firing", "Firing alert instances, by rule and severity", labels=["rule", "severity"]
        )
        counts: dict[tuple[str, str], int] = {}
        for rule, _active in self.firing():
            counts[(rule.name, rule.severity)] = counts.get((rule.name, rule.severity), 0) + 1
        for (rule_name, severity), n in sorted(counts.items()):
            alerts.add_metric([rule_name, severity], n)
        yield alerts
