"""What the monitor knows about the fleet, built from events and heartbeats: plain Python, no NATS.

Windows are measured in event time (the envelope's ``time``), so replaying old events does not
make them look recent, and a test can place events in the past.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from services.monitor.domain.traffic import Rollup, Traffic
from shared.events import (
    DeadLetter,
    DeployFailed,
    DeployLoading,
    DeployReady,
    DeployRejected,
    DeployReleased,
    DeployRequested,
    DeployScheduled,
    DeployUnloaded,
    DeviceInfo,
    Event,
    InferenceCompleted,
    InferenceFailed,
    LedgerCheckpoint,
    ModelLoaded,
    ModelUnloaded,
    NodeHeartbeat,
    NodeLost,
    NodeRegistered,
    NodeReturned,
    TamperDetected,
    UndeployRequested,
)

HORIZON_S = 3600.0  # how far back the request windows reach unless the monitor says (Monitor: its longest window)


@dataclass
class NodeState:
    node_id: str
    hostname: str = ""
    ram_total: int = 0
    ram_free: int = 0
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    utilisation: dict[str, float] = field(default_factory=dict)
    loaded_models: list[str] = field(default_factory=list)
    heartbeat_interval_s: float = 5.0
    last_seen: float = 0.0  # epoch seconds of the last heartbeat or registration
    lost: bool = False


@dataclass
class DeploymentState:
    deployment_id: str
    model: str
    version: int | None = None
    node_id: str | None = None
    device: str | None = None
    state: str = "requested"
    reason: str | None = None
    updated: float = 0.0
    runtime: str | None = None  # what deploy.ready said serves it
    loaded: bool | None = None  # on-demand: in memory now (deploy.model_loaded / model_unloaded); None: not on-demand


@dataclass
class LedgerState:
    tree_size: int | None = None
    root_hash: str | None = None
    key_id: str | None = None
    signature: str | None = None
    signed_at: float | None = None
    lag: int | None = None  # events in EVENTS the ledger has not appended yet
    tamper_events: list[tuple[float, int, str]] = field(default_factory=list)  # (at, index, reason)


@dataclass
class FleetState:
    nodes: dict[str, NodeState] = field(default_factory=dict)
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    traffic: Traffic = field(default_factory=lambda: Traffic(HORIZON_S))  # the request windows
    ledger: LedgerState = field(default_factory=LedgerState)
    dead_letters: deque[tuple[float, str, str]] = field(
        default_factory=lambda: deque(maxlen=10_000)
    )  # (at, service, reason)
    dead_letter_totals: Counter[str] = field(default_factory=Counter)
    events_seen: Counter[str] = field(default_factory=Counter)

    # -- input -----------------------------------------------------------------------------
    def apply(self, event: Event) -> None:
        """Fold one event into the state; unknown types are only counted."""
        self.events_seen[event.type] += 1
        at = event.time.timestamp()
        data = event.data
        match data:
            case NodeRegistered():
                node = self._node(data.node_id)
                node.hostname, node.ram_total, node.heartbeat_interval_s = (
                    data.hostname,
                    data.ram_total,
                    data.heartbeat_interval_s,
                )
                node.devices = {d.id: d for d in data.devices}
                node.last_seen, node.lost = max(node.last_seen, at), False
            case NodeLost():
                self._node(data.node_id).lost = True
            case NodeReturned():
                self._node(data.node_id).lost = False
            case DeployRequested():
                self._deployment(data.deployment_id, data.model_ref, "requested", at)
            case DeployScheduled():
                dep = self._deployment(data.deployment_id, data.model.name, "scheduled", at)
                dep.version, dep.node_id, dep.device = data.model.version, data.node_id, data.device
            case DeployRejected():
                self._deployment(data.deployment_id, data.model_ref, "rejected", at).reason = data.reason
            case DeployLoading() | DeployReady() | DeployUnloaded():
                state = {DeployLoading: "loading", DeployReady: "ready", DeployUnloaded: "unloaded"}[type(data)]
                dep = self._deployment(data.deployment_id, data.model.name, state, at)
                dep.version, dep.node_id, dep.reason = data.model.version, data.node_id, None
                dep.device = getattr(data, "device", dep.device)
                dep.runtime = getattr(data, "runtime", None) or dep.runtime
                dep.loaded = False if getattr(data, "on_demand", False) else None
            case ModelLoaded() | ModelUnloaded():
                dep = self._deployment(data.deployment_id, data.model.name, "ready", at)
                dep.version, dep.node_id, dep.device = data.model.version, data.node_id, data.device
                dep.loaded = isinstance(data, ModelLoaded)
                dep.runtime = getattr(data, "runtime", None) or dep.runtime
            case DeployFailed():
                dep = self._deployment(data.deployment_id, data.model.name if data.model else "?", "failed", at)
                dep.node_id, dep.reason = data.node_id, data.reason
            case DeployReleased():
                dep = self._deployment(data.deployment_id, data.model.name, "released", at)
                dep.reason = data.reason
            case UndeployRequested():
                if data.deployment_id and data.deployment_id in self.deployments:
                    self.deployments[data.deployment_id].state = "undeploying"
            case InferenceCompleted():
                self.traffic.record(
                    data.model.name,
                    at,
                    True,
                    data.e2e_seconds,
                    data.time_to_first_token_seconds,
                    data.completion_tokens,
                )
            case InferenceFailed():
                self.traffic.record(model_name(data.model_ref), at, False, data.e2e_seconds)
            case LedgerCheckpoint():
                ledger = self.ledger
                if ledger.tree_size is None or data.tree_size >= ledger.tree_size:
                    ledger.tree_size, ledger.root_hash, ledger.key_id = data.tree_size, data.root_hash, data.key_id
                    ledger.signature, ledger.signed_at = data.signature, data.signed_at.timestamp()
            case TamperDetected():
                self.ledger.tamper_events.append((at, data.index, data.reason))

    def heartbeat(self, beat: NodeHeartbeat, at: float) -> None:
        node = self._node(beat.node_id)
        node.ram_free, node.utilisation, node.loaded_models = (
            beat.ram_free,
            dict(beat.utilisation),
            list(beat.loaded_models),
        )
        for device in beat.devices:
            node.devices[device.id] = device
        node.last_seen, node.lost = max(node.last_seen, at), False

    def restart_heartbeat_clocks(self, now: float) -> None:
        """After a restart: a node that was not lost counts its silence from ``now``."""
        for node in self.nodes.values():
            if not node.lost:
                node.last_seen = max(node.last_seen, now)

    def dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.append((letter.time.timestamp(), letter.service, letter.reason))
        self.dead_letter_totals[letter.service] += 1

    # -- queries ---------------------------------------------------------------------------
    def window(self, now: float, seconds: float, model: str | None = None, *, ttft: bool = True) -> Rollup:
        """The requests that finished in the last ``seconds`` (whole seconds: see traffic.py)."""
        return self.traffic.window(now, seconds, model, ttft=ttft)

    def models(self) -> list[str]:
        return sorted(self.traffic.models() | {d.model for d in self.deployments.values()})

    def deployments_by_state(self) -> Counter[tuple[str, str]]:
        return Counter((d.model, d.state) for d in self.deployments.values())

    # -- helpers ---------------------------------------------------------------------------
    def _node(self, node_id: str) -> NodeState:
        return self.nodes.setdefault(node_id, NodeState(node_id))

    def _deployment(self, deployment_id: str, model: str, state: str, at: float) -> DeploymentState:
        dep = self.deployments.setdefault(deployment_id, DeploymentState(deployment_id, model_name(model)))
        dep.state, dep.updated = state, at
        return dep


def model_name(ref: str) -> str:
    """``name``, ``name:3`` or ``name@prod`` -> ``name``: metrics are per model, not per reference."""
    return ref.split("@", 1)[0].split(":", 1)[0]
