"""Placement: which (node, device) gets each replica of a deployment.

1. filter: the node is alive, the device matches the constraints, and the device has room for the
   prediction for its kind (CPU and CUDA need different bytes: the CPU computes in float32);
2. score: GPUs before the CPU; replicas of one deployment on distinct nodes where possible; then the
   policy: ``binpack`` takes the device left with the least free memory (keeps whole GPUs free for
   big models), ``spread`` the one left with the largest free share (evens out load);
3. all or nothing: a deployment with N replicas is placed only if every replica fits.

A rejection names the numbers: what was needed, and per device what was free or why it was excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.hardware_inventory.domain.model import Allocations, Telemetry
from services.hardware_inventory.domain.policy import excluding_selector, label_rule
from shared.errors import Invalid
from shared.events import DeviceInfo
from shared.inventory import FitEstimate, NodeRecord, Policy

GB = 1e9
KNOWN_KEYS = ("device", "node", "hostname", "gpu.product", "gpu.uuid", "gpu.compute_capability", "label.<name>")
DEVICE_VALUES = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def parse_constraint(text: str) -> tuple[str, str]:
    """``K=V`` from the command line; Invalid names the expected syntax."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise Invalid(f"constraint {text!r} is not KEY=VALUE (e.g. gpu.product=H100, device=cpu, label.zone=a)")
    return key.strip(), value.strip()


def validate_constraints(constraints: dict[str, str]) -> dict[str, str]:
    for key, value in constraints.items():
        if not value.strip():
            raise Invalid(f"constraint {key!r} has an empty value")
        if key.startswith("label.") and len(key) > len("label."):
            continue
        if key not in KNOWN_KEYS:
            raise Invalid(f"unknown constraint key {key!r}; known keys: {', '.join(KNOWN_KEYS)}")
        if key == "device":
            bad = [v for v in _alternatives(value) if v not in DEVICE_VALUES]
            if bad:
                raise Invalid(f"constraint device={value!r}: expected cpu, cuda or gpu")
        if key == "gpu.compute_capability":
            try:
                [_version(v) for v in _alternatives(value)]
            except ValueError:
                raise Invalid(f"constraint gpu.compute_capability={value!r}: expected a minimum like 8.0") from None
    return constraints


def _alternatives(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",") if v.strip()]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def constraint_mismatch(constraints: dict[str, str], node: NodeRecord, device: DeviceInfo) -> str | None:
    """None when the device satisfies every constraint, else the first one it fails, as ``K=V``."""
    for key, value in constraints.items():
        options = _alternatives(value)
        if key == "device":
            ok = device.kind in {DEVICE_VALUES[o] for o in options}
        elif key == "node":
            ok = node.node_id.lower() in options
        elif key == "hostname":
            ok = node.hostname.lower() in options
        elif key == "gpu.product":  # substring: H100 matches "NVIDIA H100 80GB HBM3"
            ok = device.kind == "cuda" and any(o in device.name.lower() for o in options)
        elif key == "gpu.uuid":
            ok = device.kind == "cuda" and (device.uuid or "").lower() in options
        elif key == "gpu.compute_capability":  # a minimum
            ok = device.kind == "cuda" and device.compute_capability is not None and any(
                _version(device.compute_capability) >= _version(o) for o in options)
        else:  # label.<name>
            ok = node.labels.get(key.removeprefix("label."), "").lower() in options
        if not ok:
            return f"{key}={value}"
    return None


@dataclass(frozen=True)
class Slot:
    node: NodeRecord
    device: DeviceInfo
    capacity: int
    available: int

    @property
    def key(self) -> tuple[str, str]:
        return self.node.node_id, self.device.id


@dataclass(frozen=True)
class Choice:
    node_id: str
    device: DeviceInfo
    estimate: FitEstimate
    booked_bytes: int


class NoFit(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def capacity_of(device: DeviceInfo, utilisation_cap: dict[str, float]) -> int:
    return int(device.memory_total * utilisation_cap.get(device.kind, 0.9))


def slots(
    nodes: Iterable[NodeRecord],
    allocations: Allocations,
    telemetry: dict[str, Telemetry],
    utilisation_cap: dict[str, float],
) -> list[Slot]:
    """Every device of every node with its free room: usable capacity minus bookings, and never more
    than the live free memory (something outside Strata may use the card) minus bookings not yet loaded."""
    result = []
    for node in nodes:
        live = telemetry.get(node.node_id)
        for device in node.devices:
            capacity = capacity_of(device, utilisation_cap)
            available = capacity - allocations.booked(node.node_id, device.id)
            live_device = live.devices.get(device.id) if live else None
            if live_device is not None:
                available = min(available, live_device.memory_free - allocations.pending_load(node.node_id, device.id))
            result.append(Slot(node, device, capacity, available))
    return result


def place(
    replicas: int,
    candidates: list[Slot],
    need: Callable[[str], FitEstimate],
    constraints: dict[str, str],
    policy: Policy,
    *,
    taken: Iterable[tuple[str, str]] = (),
    used_nodes: Iterable[str] = (),
    exclusions: dict[str, str] | None = None,
) -> list[Choice]:
    """Choose a slot for each of ``replicas`` replicas; NoFit with the numbers when one does not fit.
    ``taken`` are devices already holding a replica of this deployment; ``used_nodes`` their nodes;
    ``exclusions`` the admission policy's label selectors this model is kept off (selector -> why)."""
    exclusions = exclusions or {}
    taken, used = set(taken), set(used_nodes)
    free = {s.key: s.available for s in candidates}
    chosen: list[Choice] = []
    for _ in range(replicas):
        fitting: list[tuple[tuple, Slot, FitEstimate]] = []
        for slot in candidates:
            if (
                slot.node.status != "alive"
                or slot.key in taken
                or constraint_mismatch(constraints, slot.node, slot.device)
            ):
                continue
            if excluding_selector(exclusions, slot.node.labels):
                continue
            estimate = need(slot.device.kind)
            left = free[slot.key] - estimate.booked
            if left < 0:
                continue
            policy_score = left if policy == "binpack" else -left / max(slot.capacity, 1)
            rank = (
                slot.device.kind != "cuda",
                slot.node.node_id in used,
                policy_score,
                slot.node.node_id,
                slot.device.id,
            )
            fitting.append((rank, slot, estimate))
        if not fitting:
            raise NoFit(explain(len(chosen), replicas, candidates, free, need, constraints, taken, exclusions))
        _, slot, estimate = min(fitting, key=lambda f: f[0])
        free[slot.key] -= estimate.booked
        taken.add(slot.key)
        used.add(slot.node.node_id)
        chosen.append(Choice(slot.node.node_id, slot.device, estimate, estimate.booked))
    return chosen


def explain(
    placed: int,
    replicas: int,
    candidates: list[Slot],
    free: dict,
    need: Callable[[str], FitEstimate],
    constraints: dict[str, str],
    taken: set,
    exclusions: dict[str, str] | None = None,
) -> str:
    if not candidates:
        return "no nodes are registered"
    kinds = sorted({s.device.kind for s in candidates})
    needs = ", ".join(f"{gb(need(k).booked)} on {k}" for k in kinds)
    lines = []
    for slot in sorted(candidates, key=lambda s: s.key):
        where = f"{slot.node.node_id}/{slot.device.id}"
        if slot.node.status != "alive":
            lines.append(f"{where}: node lost")
        elif (mismatch := constraint_mismatch(constraints, slot.node, slot.device)) is not None:
            lines.append(f"{where}: excluded by {mismatch}")
        elif (selector := excluding_selector(exclusions or {}, slot.node.labels)) is not None:
            lines.append(f"{where}: excluded by policy {label_rule(selector)} ({exclusions[selector]})")
        elif slot.key in taken:
            lines.append(f"{where}: holds another replica")
        else:
            lines.append(
                f"{where}: {gb(max(free[slot.key], 0))} free of {gb(slot.capacity)} usable, "
                f"needs {gb(need(slot.device.kind).booked)}"
            )
    head = f"no device fits replica {placed + 1} of {replicas}" if replicas > 1 else "no device fits"
    return f"{head} (needs {needs}): " + "; ".join(lines)
