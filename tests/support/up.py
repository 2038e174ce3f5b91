"""`strata up` as a subprocess on free ports, for tests that need the whole platform."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from cli import natsd
from shared.apikeys import key_file
from shared.config import SERVICES


class Up:
    """A `strata up` process on free ports, with its output collected line by line."""

    def __init__(self, data_dir: Path, *extra: str, **ports: int) -> None:
        self.data_dir = data_dir  # the CLI finds the NATS credential (and CA) `strata up` made there
        self.nats_port, monitor = natsd.free_port(), natsd.free_port()
        self.ports = {name: ports.get(name.replace("-", "_")) or natsd.free_port() for name in SERVICES}
        argv = [sys.executable, "-m", "cli.main", "up", "--data-dir", str(data_dir),
                "--nats-port", str(self.nats_port), "--nats-monitor-port", str(monitor), *extra]
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

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def api_key(self) -> str:
        """The admin API key `strata up` made at its first start."""
        return key_file(self.data_dir).read_text().strip()

    def strata(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """A `strata` command against this platform, as its admin (the key, data dir and model-store URL)."""
        env = {**os.environ, "STRATA_API_KEY": self.api_key, "STRATA_DATA_DIR": str(self.data_dir),
               "STRATA_MODEL_STORE_URL": self.url("model-store")}
        return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)

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
