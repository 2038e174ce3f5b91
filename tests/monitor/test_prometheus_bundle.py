"""The Prometheus and Grafana bundle as docker-compose mounts it, checked by Debian's promtool: the
config with its rule files where the container sees them, the recording rules' unit tests, and
Grafana's provisioning laid out as Grafana reads it (datasources/ and dashboards/ providers)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool missing: .ci/run installs Debian's prometheus package (apt-get install prometheus)",
)


def container_files(service: str, root: Path) -> Path:
    """Copies what ``service`` bind-mounts from the repository to where its container sees it,
    under ``root``: the container's filesystem as far as this repository makes it."""
    for volume in COMPOSE["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith("."):
            continue  # a named volume: data, not configuration
        src, dst = ROOT / source, root / target.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return root


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_config_compose_mounts_with_its_rule_files(tmp_path):
    fs = container_files("prometheus", tmp_path)
    config = fs / "etc/prometheus/prometheus.yml"
    rule_files = yaml.safe_load(config.read_text())["rule_files"]
    # relative rule files resolve beside the config, in the container and here alike
    assert rule_files and not any(f.startswith("/") for f in rule_files), rule_files
    out = promtool("check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "rule files found" in out.stdout, out.stdout


def test_prometheus_scrapes_every_strata_process_compose_runs():
    from shared.config import DEFAULT_PORTS

    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    scraped = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert all(job["metrics_path"] == "/metrics" for job in config["scrape_configs"])
    expected = {
        f"{name}:{DEFAULT_PORTS[spec['command'][1]]}"
        for name, spec in COMPOSE["services"].items()
        if spec.get("command", [None])[0] == "serve" and not spec.get("profiles")
    }
    assert len(expected) >= 9 and scraped == expected, scraped ^ expected


@needs_promtool
def test_recording_rules_pass_their_promtool_unit_tests():
    """tests/monitor/promtool/strata_rules_test.yml: among others, a model that never failed keeps
    its request rate (the sum of a success and a missing failure series was empty)."""
    out = promtool("test", "rules", str(ROOT / "tests/monitor/promtool/strata_rules_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_grafana_provisioning_has_a_prometheus_datasource_and_a_provider_for_the_dashboard(tmp_path):
    fs = container_files("grafana", tmp_path)
    provisioning = fs / "etc/grafana/provisioning"
    datasources = [
        d
        for f in sorted((provisioning / "datasources").glob("*.yml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.yml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    dashboards = fs / providers[0]["options"]["path"].lstrip("/")
    assert (dashboards / "strata.json").is_file(), f"the provider reads {dashboards}, which lacks strata.json"
    # every panel asks a datasource of the kind provisioned (through the dashboard's variable)
    panels = json.loads((dashboards / "strata.json").read_text())["panels"]
    assert panels and all(p["datasource"]["type"] == "prometheus" for p in panels)


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus missing: .ci/run installs Debian's prometheus package"
)
async def test_a_real_prometheus_scrapes_the_monitor_and_records_the_rules(running, tmp_path):
    """Debian's prometheus, with infra/prometheus's config (scrape target pointed at this monitor,
    intervals shortened) and rules, scrapes a scripted run and evaluates the recording rules."""
    import asyncio
    import time

    import httpx

    from cli.natsd import free_port
    from tests.monitor.script import scripted_run

    port = free_port()

    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "strata-monitor")
    job["static_configs"][0]["targets"] = [running.url.removeprefix("http://")]
    config["scrape_configs"] = [job]  # the other services are not running here
    shutil.copy(ROOT / "infra/prometheus/strata-rules.yml", tmp_path / "strata-rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        await scripted_run(running.publisher)

        async def query(client: httpx.AsyncClient, expr: str) -> dict[str, float]:
            r = await client.get(f"{api}/query", params={"query": expr})
            r.raise_for_status()
            return {s["metric"].get("model_name", ""): float(s["value"][1]) for s in r.json()["data"]["result"]}

        deadline, rates = time.monotonic() + 45, {}
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    rates = await query(client, "model_name:strata_requests:rate1m")
                    if "tiny" in rates:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                await asyncio.sleep(0.5)
            assert "tiny" in rates, (tmp_path / "prometheus.log").read_text()[-2000:]
            targets = (await client.get(f"{api}/targets")).json()["data"]["activeTargets"]
            assert [t["health"] for t in targets] == ["up"], targets
            up = await query(client, 'up{job="strata-monitor"}')
            assert list(up.values()) == [1.0]
            assert await query(client, "strata:request_success_total")  # the monitor's counters, scraped
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
