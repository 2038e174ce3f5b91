"""Each alert rule fires and resolves, as alert.firing / alert.resolved events through a real NATS and
in GET /alerts. Windows and thresholds come from a test rules file, so nothing waits long."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.monitor.config import MonitorConfig
from services.monitor.adapters.rules_file import load_rules
from shared import errors
from shared.events import AlertFiring, AlertResolved, parse_event
from tests.monitor.conftest import Running, fast_config, until
from shared.events import DeployLoading, DeployReady, MeasuredMemory, NodeLost, NodeReturned, TamperDetected
from tests.monitor.script import BROKEN, beat, completed, deployments, failed, fleet

RULES = """
rules:
  - {name: node_lost, kind: node_lost, severity: critical, silence_s: 3.0}
  - {name: deploy_failed, kind: deploy_failed, window_s: 600}
  - {name: latency_slo, kind: latency_p95, threshold: 1.0, window_s: 600, min_requests: 5}
  - {name: error_rate, kind: error_rate, severity: critical, threshold: 0.3, window_s: 600, min_requests: 4}
  - {name: dead_letters, kind: dead_letters, threshold: 0, window_s: 2.0}
  - {name: ledger_tamper, kind: ledger_tamper, severity: critical, window_s: 2.0}
"""


@pytest.fixture
def monitor_config(tmp_path: Path) -> MonitorConfig:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return fast_config(rules_file=path)


class Alerts:
    """alert.* events as another service sees them on NATS."""

    def __init__(self) -> None:
        self.events: list = []

    async def watch(self, running: Running) -> None:
        async def got(msg) -> None:
            self.events.append(parse_event(msg.data, msg.subject).data)

        await running.publisher.nc.subscribe("evt.alert.>", cb=got)

    def of(self, rule: str, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.rule == rule]


async def rule_state(running: Running, name: str) -> dict:
    rules = (await running.http.get("/alerts")).json()
    return next(r for r in rules if r["name"] == name)


async def expect(running: Running, alerts: Alerts, rule: str, kind: type, count: int = 1) -> list:
    await until(lambda: len(alerts.of(rule, kind)) >= count, f"{kind.TYPE} of {rule}")
    return alerts.of(rule, kind)


@pytest.fixture
async def watched(running: Running) -> Alerts:
    alerts = Alerts()
    await alerts.watch(running)
    return alerts


async def test_node_lost_fires_on_the_event_and_on_silence_and_resolves_on_a_heartbeat(
    running: Running, watched: Alerts
):
    p = running.publisher
    await fleet(p)
    await until(lambda: len(running.monitor.state.nodes) == 2, "the fleet")
    await p.send(NodeLost(node_id="gpu-1", last_seen=datetime.now(timezone.utc), missed_beats=3))
    fired = (await expect(running, watched, "node_lost", AlertFiring))[0]
    assert fired.labels == {"node": "gpu-1"} and fired.severity == "critical" and "gpu-1" in fired.summary
    state = await rule_state(running, "node_lost")
    assert state["state"] == "firing" and {"node": "gpu-1"} in [f["labels"] for f in state["firing"]]

    await p.send(NodeReturned(node_id="gpu-1"))
    await beat(p)
    resolved = (await expect(running, watched, "node_lost", AlertResolved))[0]
    assert resolved.labels == {"node": "gpu-1"}

    # silence alone (no node.lost: the inventory may be down as well) fires after silence_s
    await until(lambda: len(watched.of("node_lost", AlertFiring)) >= 3, "both nodes silent for 3 s", timeout=10)
    assert {frozenset(e.labels.items()) for e in watched.of("node_lost", AlertFiring)[1:]} == {
        frozenset({("node", "cpu-1")}),
        frozenset({("node", "gpu-1")}),
    }
    await beat(p)
    await expect(running, watched, "node_lost", AlertResolved, 3)
    assert (await rule_state(running, "node_lost"))["state"] in (
        "ok",
        "firing",
    )  # silence may begin again on a slow box


async def test_deploy_failed_fires_and_resolves_when_the_deployment_becomes_ready(running: Running, watched: Alerts):
    await deployments(running.publisher)
    [fired] = await expect(running, watched, "deploy_failed", AlertFiring)
    assert fired.labels["deployment"] == "dep-broken" and "signature does not verify" in fired.summary
    p = running.publisher
    await p.send(DeployLoading(deployment_id="dep-broken", model=BROKEN, node_id="cpu-1", device="cpu"))
    await p.send(
        DeployReady(
            deployment_id="dep-broken",
            model=BROKEN,
            node_id="cpu-1",
            device="cpu",
            measured=MeasuredMemory(weights=1, kv_cache=1, peak=2),
            load_seconds=1.0,
        )
    )
    [resolved] = await expect(running, watched, "deploy_failed", AlertResolved)
    assert resolved.labels == fired.labels
    assert (await rule_state(running, "deploy_failed"))["state"] == "ok"


async def test_p95_latency_above_the_slo_fires_and_resolves_when_the_window_is_fast_again(
    running: Running, watched: Alerts
):
    p = running.publisher
    for i in range(5):
        await p.send(completed(i, e2e=3.0))
    [fired] = await expect(running, watched, "latency_slo", AlertFiring)
    assert fired.labels == {"model_name": "tiny"} and fired.value == 3.0
    assert (await rule_state(running, "latency_slo"))["firing"][0]["value"] == 3.0
    for i in range(5, 200):  # p95 of the window falls under the SLO
        await p.send(completed(i, e2e=0.2))
    await expect(running, watched, "latency_slo", AlertResolved)
    assert (await rule_state(running, "latency_slo"))["state"] == "ok"


async def test_requests_outside_the_window_do_not_count(running: Running, watched: Alerts):
    long_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    for i in range(10):
        await running.publisher.send(completed(i, e2e=30.0), at=long_ago)
    await until(lambda: running.monitor.state.events_seen["inference.completed"] == 10, "old requests")
    await running.monitor.evaluate()
    assert (await rule_state(running, "latency_slo"))["state"] == "ok" and not watched.events


async def test_error_rate_above_the_threshold_fires_and_resolves(running: Running, watched: Alerts):
    p = running.publisher
    for i in range(2):
        await p.send(completed(i))
        await p.send(failed(i))
    [fired] = await expect(running, watched, "error_rate", AlertFiring)
    assert fired.labels == {"model_name": "tiny"} and fired.value == 0.5 and fired.severity == "critical"
    for i in range(2, 12):
        await p.send(completed(i))
    await expect(running, watched, "error_rate", AlertResolved)


async def test_dead_letters_fire_per_service_and_resolve_after_the_window(running: Running, watched: Alerts):
    await running.publisher.dead_letter("provenance-ledger")
    [fired] = await expect(running, watched, "dead_letters", AlertFiring)
    assert fired.labels == {"service": "provenance-ledger"} and fired.value == 1
    [resolved] = await expect(running, watched, "dead_letters", AlertResolved)
    assert resolved.labels == {"service": "provenance-ledger"}


async def test_ledger_verification_failure_fires_and_resolves_after_the_window(running: Running, watched: Alerts):
    await running.publisher.send(
        TamperDetected(index=41, reason="leaf_hash: leaf 41 does not hash to the stored value")
    )
    [fired] = await expect(running, watched, "ledger_tamper", AlertFiring)
    assert "leaf 41" in fired.summary and fired.severity == "critical"
    await expect(running, watched, "ledger_tamper", AlertResolved)


async def test_an_alert_that_cannot_be_published_is_published_on_the_next_evaluation(running: Running, watched: Alerts):
    monitor = running.monitor
    real_publish = monitor.publish

    async def broken(_data) -> None:
        raise ConnectionError("nats is away")

    monitor.publish = broken
    await running.publisher.dead_letter("api-gateway")
    await until(lambda: monitor.state.dead_letter_totals["api-gateway"] == 1, "the dead letter")
    await monitor.evaluate()
    assert not watched.of("dead_letters", AlertFiring) and (await rule_state(running, "dead_letters"))["state"] == "ok"
    monitor.publish = real_publish
    await expect(running, watched, "dead_letters", AlertFiring)


def test_a_bad_rules_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: x, kind: cpu_melted}\n")
    with pytest.raises(errors.Invalid, match=r"rules.yaml.*rules\.0\.kind"):
        load_rules(path)
    path.write_text("rules:\n  - {name: x, kind: node_lost}\n  - {name: x, kind: deploy_failed}\n")
    with pytest.raises(errors.Invalid, match="unique"):
        load_rules(path)
    path.write_text("rules: [")
    with pytest.raises(errors.Invalid, match="cannot read"):
        load_rules(path)


def test_the_shipped_rules_file_loads_and_covers_every_kind():
    rules = load_rules(MonitorConfig().rules_file)
    assert {r.kind for r in rules} == {
        "node_lost",
        "deploy_failed",
        "latency_p95",
        "error_rate",
        "dead_letters",
        "ledger_tamper",
    }
