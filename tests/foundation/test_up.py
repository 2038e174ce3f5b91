"""`strata up` end to end: real nats-server, every service as its own process, real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli import natsd
from shared.config import SERVICES


class Up:
    """A `strata up` process on free ports, with its output collected line by line."""

    def __init__(self, data_dir: Path, **ports: int) -> None:
        self.nats_port, monitor = natsd.free_port(), natsd.free_port()
        self.ports = {name: ports.get(name.replace("-", "_")) or natsd.free_port() for name in SERVICES}
        argv = [sys.executable, "-m", "cli.main", "up", "--data-dir", str(data_dir),
                "--nats-port", str(self.nats_port), "--nats-monitor-port", str(monitor)]
        for name, port in self.ports.items():
            argv += ["--port", f"{name}={port}"]
        self.lines: list[str] = []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {text!r} after {timeout}s; output:\n{''.join(self.lines[-40:])}")
            time.sleep(0.1)

    def children(self) -> dict[int, str]:
        """pid -> command line of every direct child."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found[int(entry.name)] = cmdline
        return found

    def health(self, name: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.ports[name]}/healthz", timeout=2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def strata_up(tmp_path):
    started: list[Up] = []

    def start(**ports: int) -> Up:
        up = Up(tmp_path / "data", **ports)
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
    children = up.children()
    assert len(children) == len(SERVICES) + 1
    assert sum("nats-server" in cmd for cmd in children.values()) == 1

    cli = subprocess.run([sys.executable, "-m", "cli.main", "health", "--nats-url", f"nats://127.0.0.1:{up.nats_port}"],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.count(" ok ") == len(SERVICES)

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=30) == 0
    assert [pid for pid in children if alive(pid)] == []
    assert "strata up: stopped" in "".join(up.lines)


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
    result = subprocess.run([sys.executable, "-m", "cli.main", "health", "--nats-url", f"nats://127.0.0.1:{natsd.free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr
    assert time.monotonic() - started < 20
