"""infra/prometheus and infra/grafana parse, and every metric they query is one the monitor exposes."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.monitor.config import MonitorConfig
from services.monitor.adapters.rules_file import load_rules
from services.monitor.service_layer.monitor import Monitor
from shared.events import (
    DeadLetter,
    DeployFailed,
    DeployReady,
    LedgerCheckpoint,
    MeasuredMemory,
    NodeHeartbeat,
    NodeRegistered,
    Source,
    make_event,
)
from tests.monitor.script import BROKEN, CPU, GPU, TINY, completed, failed

INFRA = Path(__file__).resolve().parents[2] / "infra"


def exposed_sample_names() -> set[str]:
    """The sample names of a monitor that has seen one of everything (no NATS needed: plain domain)."""

    async def publish(_data) -> None:
        return None

    monitor = Monitor(MonitorConfig(), load_rules(MonitorConfig().rules_file), publish)
    src = Source(service="t", node="n")
    for data in (
        NodeRegistered(node_id="gpu-1", hostname="b", cpu_model="x", cpu_cores=1, ram_total=1, devices=[CPU, GPU]),
        DeployReady(
            deployment_id="d",
            model=TINY,
            node_id="gpu-1",
            device="cuda:0",
            measured=MeasuredMemory(weights=1, kv_cache=1, peak=1),
            load_seconds=1,
        ),
        DeployFailed(deployment_id="e", model=BROKEN, node_id="gpu-1", reason="x"),
        completed(1),
        failed(1),
        LedgerCheckpoint(tree_size=3, root_hash="00", signature="s", key_id="k", signed_at=datetime.now(timezone.utc)),
    ):
        monitor.state.apply(make_event(data, src))
        monitor.metrics.observe(make_event(data, src))
    monitor.state.heartbeat(NodeHeartbeat(node_id="gpu-1", ram_free=1, devices=[GPU], utilisation={"cuda:0": 0.5}), 0)
    monitor.state.ledger.lag = 0
    letter = DeadLetter(service="s", consumer="c", subject="x", reason="r", deliveries=1, payload="")
    monitor.state.dead_letter(letter)
    monitor.metrics.dead_letter(letter)
    monitor.alerts.evaluate(monitor.state, datetime.now(timezone.utc).timestamp())
    text = monitor.metrics.exposition().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_config_scrapes_the_monitor_and_its_rules_use_exposed_metrics():
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "strata-monitor")
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["monitor:8001"]
    rules = yaml.safe_load((INFRA / "prometheus" / "strata-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    names = exposed_sample_names()
    for expr in exprs:
        for metric in re.findall(r"strata:[a-z0-9_]+", expr):
            assert metric in names, f"{metric} (in {expr}) is not exposed"


def test_grafana_dashboard_has_the_dashboards_panels_and_queries_exposed_metrics():
    dashboard = json.loads((INFRA / "grafana" / "dashboards" / "strata.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for expected in (
        "Firing alerts",
        "Request rate",
        "End-to-end latency (p50 / p95 / p99)",
        "Tokens / s",
        "Device memory used",
        "Deployments by state",
        "Ledger: signed tree size and lag",
        "Dead letters per service",
    ):
        assert expected in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = exposed_sample_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"strata:[a-z0-9_]+", target["expr"]):
                assert metric in names, f"panel {panel['title']!r} queries {metric}, which the monitor does not expose"
