"""`strata up` end to end: real nats-server, every service as its own process, real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli import natsd
from shared.config import SERVICES
from tests.support.up import Up, alive


@pytest.fixture
def strata_up(tmp_path):
    started: list[Up] = []

    def start(*extra: str, **ports: int) -> Up:
        up = Up(tmp_path / "data", "--no-builtin", *extra, **ports)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def test_up_brings_every_service_to_healthy_and_sigterm_leaves_no_process(strata_up):
    up = strata_up()
    up.wait_for("Strata is up")
    for name in SERVICES:
        body = up.health(name).json()
        assert body["status"] == "ok" and body["service"] == name and body["nats_connected"]
    # the first start made an admin key: every HTTP API is closed, and the key opens the admin routes
    assert (
        up.health("api-gateway").json()["auth"] == "api-keys"
        and (up.data_dir / "api-key").stat().st_mode & 0o777 == 0o600
    )
    checkpoint = up.url("provenance-ledger") + "/checkpoint"
    assert httpx.post(checkpoint, timeout=10).status_code == 401
    assert httpx.post(checkpoint, headers={"Authorization": f"Bearer {up.api_key}"}, timeout=10).status_code == 200
    children = up.children()
    assert len(children) == len(SERVICES) + 1
    assert sum("nats-server" in cmd for cmd in children.values()) == 1

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "health",
            "--nats-url",
            f"nats://127.0.0.1:{up.nats_port}",
            "--data-dir",
            str(up.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.count(" ok ") == len(SERVICES)

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=30) == 0
    assert [pid for pid in children if alive(pid)] == []
    assert "strata up: stopped" in "".join(up.lines)


def test_a_second_strata_up_on_the_same_data_dir_is_refused_and_the_cli_finds_the_first(strata_up, tmp_path):
    """#20 item 7: a second stack on one data dir shared the JetStream store, and on exit deleted the
    first one's endpoints.json, so the CLI silently talked to another stack."""
    first = strata_up()
    first.wait_for("Strata is up")
    endpoints_file = first.data_dir / "endpoints.json"
    recorded = endpoints_file.read_text()
    second = strata_up()
    assert second.process.wait(timeout=30) == 2
    said = "".join(second.lines)
    assert f"the data dir {first.data_dir} is in use by another strata up (pid {first.process.pid}" in said, said
    assert endpoints_file.read_text() == recorded and first.process.poll() is None
    assert f"nats://127.0.0.1:{first.nats_port}" in recorded

    env = {k: v for k, v in os.environ.items() if k != "STRATA_NATS_URL"}
    cli = subprocess.run(
        [sys.executable, "-m", "cli.main", "health"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "STRATA_DATA_DIR": str(first.data_dir)},
    )  # the data dir alone points at the stack
    assert cli.returncode == 0 and cli.stdout.count(" ok ") == len(SERVICES), cli.stdout + cli.stderr
    assert "no running strata up" not in cli.stderr
    elsewhere = subprocess.run(
        [sys.executable, "-m", "cli.main", "health", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "STRATA_DATA_DIR": str(tmp_path / "nothing-here")},
    )
    assert (
        "no running strata up recorded in" in elsewhere.stderr
        and "using NATS at nats://127.0.0.1:4222" in elsewhere.stderr
    )


def test_a_crashed_service_is_restarted(strata_up):
    up = strata_up()
    up.wait_for("Strata is up")
    [victim] = [pid for pid, cmd in up.children().items() if cmd.endswith("serve model-store ")]
    os.kill(victim, signal.SIGKILL)
    up.wait_for("restarting in", timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if up.health("model-store").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("model-store did not come back")
    assert victim not in up.children()


def test_children_die_with_a_killed_supervisor(strata_up):
    up = strata_up()
    up.wait_for("Strata is up")
    children = up.children()
    up.process.kill()
    up.process.wait(timeout=10)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in children if alive(pid)] == []


def test_a_port_in_use_is_named_with_the_flag_that_changes_it(strata_up, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = strata_up(monitor=port)
        assert up.process.wait(timeout=30) == 2
    output = "".join(up.lines)
    assert f"port {port} for monitor is already in use" in output and "--port monitor=PORT" in output


def test_health_without_nats_says_so_quickly():
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "health", "--nats-url", f"nats://127.0.0.1:{natsd.free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr
    assert time.monotonic() - started < 20


def test_a_missing_policy_file_stops_up_before_anything_starts(strata_up, tmp_path):
    up = strata_up("--policy", str(tmp_path / "nope.yaml"))
    assert up.process.wait(timeout=30) == 2
    assert f"--policy {tmp_path / 'nope.yaml'}: no such file" in "".join(up.lines)


def test_the_policy_reaches_hardware_inventory_as_an_absolute_path(tmp_path, monkeypatch):
    from cli.up import Supervisor
    from cli.up_options import UpOptions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy.yaml").write_text("require_datasets: true\n")
    supervisor = Supervisor(UpOptions(data_dir=tmp_path / "data", admission_policy=Path("policy.yaml")))
    env: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(supervisor, "_add", lambda name, argv, child_env, url: env.setdefault(name, child_env))
    supervisor._start_services("nats://127.0.0.1:4222", "node-t")
    assert env["hardware-inventory"]["STRATA_ADMISSION_POLICY"] == str(tmp_path / "policy.yaml")
    assert "STRATA_ADMISSION_POLICY" not in env["model-store"]


def test_no_api_key_leaves_the_http_apis_open_and_says_so(strata_up):
    up = strata_up("--no-api-key")
    up.wait_for("Strata is up")
    assert up.health("api-gateway").json()["auth"] == "open"
    assert not (up.data_dir / "api-key").exists()
