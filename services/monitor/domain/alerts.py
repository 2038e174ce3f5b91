"""Alert rules: loaded from a YAML file, evaluated against the fleet state, turned into transitions.

A rule of a given ``kind`` yields the set of instances that are active now (one per node, model,
deployment or service, told apart by their labels). The engine compares that set with the previous
one: a new instance fires, a vanished one resolves. Plain Python: the service layer publishes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.monitor.domain.state import FleetState
from shared import errors

Kind = Literal["node_lost", "deploy_failed", "latency_p95", "error_rate", "dead_letters", "ledger_tamper"]
Severity = Literal["info", "warning", "critical"]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Kind
    severity: Severity = "warning"
    summary: str = Field(default="", description="str.format template over the instance's labels and {value}")
    window_s: float = Field(
        default=300.0, gt=0, description="how far back the rule looks (latency, errors, dead letters, failures, tamper)"
    )
    threshold: float = Field(
        default=0.0, ge=0, description="p95 seconds (latency_p95), failed fraction (error_rate), count (dead_letters)"
    )
    min_requests: int = Field(
        default=1, ge=1, description="latency_p95 / error_rate: fewer requests in the window never fire"
    )
    silence_s: float | None = Field(
        default=None, gt=0, description="node_lost: also fire when no heartbeat came for this long"
    )


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Rule]


def parse_rules(raw: object, source: str) -> list[Rule]:
    """The rules of a parsed YAML document; a bad one is a clear error naming ``source`` and the field."""
    try:
        rules = RuleFile.model_validate(raw).rules
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.Invalid(f"invalid alert rules in {source}: {first['msg']} at {where}") from None
    names = [r.name for r in rules]
    if len(names) != len(set(names)):
        raise errors.Invalid(f"invalid alert rules in {source}: rule names must be unique")
    return rules


@dataclass(frozen=True)
class Instance:
    """One active condition of a rule."""

    labels: tuple[tuple[str, str], ...]
    value: float | None
    summary: str


@dataclass
class Active:
    instance: Instance
    since: float


@dataclass(frozen=True)
class Transition:
    rule: Rule
    instance: Instance
    firing: bool  # False: resolved


def _instance(rule: Rule, labels: dict[str, str], value: float | None, default: str) -> Instance:
    template = rule.summary or default
    try:
        summary = template.format(**labels, value=value if value is not None else math.nan)
    except (KeyError, IndexError, ValueError):
        summary = template
    return Instance(tuple(sorted(labels.items())), value, summary)


def _node_lost(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    out = []
    for node in s.nodes.values():
        silent = rule.silence_s is not None and node.last_seen and now - node.last_seen > rule.silence_s
        if node.lost or silent:
            out.append(
                _instance(
                    rule,
                    {"node": node.node_id},
                    now - node.last_seen if node.last_seen else None,
                    "node {node} stopped sending heartbeats",
                )
            )
    return out


def _deploy_failed(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    return [
        _instance(
            rule,
            {"deployment": d.deployment_id, "model": d.model, "state": d.state},
            None,
            f"deployment of {{model}} {{state}}: {d.reason or 'no reason given'}",
        )
        for d in s.deployments.values()
        if d.state in ("failed", "rejected") and now - d.updated <= rule.window_s
    ]


def _latency_p95(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    out = []
    for model in s.models():
        window = s.window(now, rule.window_s, model, ttft=False)
        if window.ok >= rule.min_requests and (p95 := window.e2e_percentile(95)) > rule.threshold:
            out.append(
                _instance(
                    rule,
                    {"model_name": model},
                    p95,
                    f"p95 end-to-end latency of {{model_name}} is {{value:.2f}}s (SLO {rule.threshold}s)",
                )
            )
    return out


def _error_rate(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    out = []
    for model in s.models():
        window = s.window(now, rule.window_s, model, ttft=False)
        if window.requests >= rule.min_requests:
            rate = window.failed / window.requests
            if rate > rule.threshold:
                out.append(
                    _instance(
                        rule,
                        {"model_name": model},
                        rate,
                        f"{{value:.0%}} of {{model_name}}'s requests failed (threshold {rule.threshold:.0%})",
                    )
                )
    return out


def _dead_letters(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    counts: dict[str, int] = {}
    for at, service, _reason in s.dead_letters:
        if now - at <= rule.window_s:
            counts[service] = counts.get(service, 0) + 1
    return [
        _instance(rule, {"service": service}, n, "{service} dead-lettered {value:.0f} message(s)")
        for service, n in sorted(counts.items())
        if n > rule.threshold
    ]


def _ledger_tamper(rule: Rule, s: FleetState, now: float) -> list[Instance]:
    recent = [(index, reason) for at, index, reason in s.ledger.tamper_events if now - at <= rule.window_s]
    if not recent:
        return []
    index, reason = recent[-1]
    return [_instance(rule, {}, len(recent), f"ledger verification failed at leaf {index}: {reason}")]


EVALUATORS: dict[str, Callable[[Rule, FleetState, float], list[Instance]]] = {
    "node_lost": _node_lost,
    "deploy_failed": _deploy_failed,
    "latency_p95": _latency_p95,
    "error_rate": _error_rate,
    "dead_letters": _dead_letters,
    "ledger_tamper": _ledger_tamper,
}


class AlertEngine:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.active: dict[str, dict[tuple[tuple[str, str], ...], Active]] = {r.name: {} for r in rules}

    def evaluate(self, state: FleetState, now: float) -> list[Transition]:
        transitions: list[Transition] = []
        for rule in self.rules:
            current = {i.labels: i for i in EVALUATORS[rule.kind](rule, state, now)}
            active = self.active[rule.name]
            for labels in list(active):
                if labels not in current:
                    transitions.append(Transition(rule, active.pop(labels).instance, firing=False))
            for labels, instance in current.items():
                if labels in active:
                    active[labels].instance = instance  # keep the latest value and summary
                else:
                    active[labels] = Active(instance, now)
                    transitions.append(Transition(rule, instance, firing=True))
        return transitions

    def restore(
        self, rule_name: str, labels: dict[str, str], firing: bool, value: float | None, summary: str, at: float
    ) -> None:
        """Take back a transition published before a restart (read back from the stream), so that
        an alert still active is not fired a second time. A rule no longer configured is ignored."""
        active = self.active.get(rule_name)
        if active is None:
            return
        key = tuple(sorted(labels.items()))
        if firing:
            active[key] = Active(Instance(key, value, summary), at)
        else:
            active.pop(key, None)

    def undo(self, transition: Transition, since: float) -> None:
        """Take back a transition whose event could not be published, so the next evaluation repeats it."""
        active = self.active[transition.rule.name]
        if transition.firing:
            active.pop(transition.instance.labels, None)
        else:
            active[transition.instance.labels] = Active(transition.instance, since)

    def firing(self) -> list[tuple[Rule, Active]]:
        return [(rule, a) for rule in self.rules for a in self.active[rule.name].values()]
