"""A real nats-server started with the config that `strata up` generates (shared/nats_auth.py)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from cli import natsd
from shared import nats_auth
from tests.support.nats import NatsServer


class SecuredNats(NatsServer):
    """``NatsServer`` with ``-c <generated config>``: each role connects with its own credential."""

    def __init__(self, data_dir: Path) -> None:
        store = data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        super().__init__(store)
        self.data_dir = data_dir
        self.config = nats_auth.write(data_dir)
        self.credentials = nats_auth.credentials(data_dir)
        self.log = store / "nats-server.log"

    def start(self) -> SecuredNats:
        log = open(self.log, "ab")
        argv = natsd.argv(self.port, self.store_dir) + ["-c", str(self.config)]
        self.process = subprocess.Popen(argv, stdout=log, stderr=log)
        self._wait_listening()
        return self

    def provision(self) -> SecuredNats:
        """Every stream and bucket, made with the bootstrap credential as `strata up` does."""
        from cli import connection
        from cli.provision import provision

        async def run() -> None:  # over TLS too, trusting the CA the way the CLI does
            nc = await connection.connect(self.url, self.data_dir, role=nats_auth.ADMIN)
            try:
                await provision(nc.jetstream())
            finally:
                await nc.close()

        asyncio.run(run())
        return self

    def url_for(self, role: str) -> str:
        return self.credentials[role].url(self.url)

    def violations(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Violation" in line]


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[SecuredNats]:
    server = SecuredNats(tmp_path / "data").start().provision()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Errors:
    """What nats-py hands to the error callback: permission violations arrive there, asynchronously."""

    seen: list[Exception] = field(default_factory=list)

    async def record(self, exc: Exception) -> None:  # nats-py wants a coroutine function
        self.seen.append(exc)

    def violations(self) -> list[str]:
        return [str(e) for e in self.seen if "permissions violation" in str(e).lower()]


async def connect_as(url: str) -> tuple[nats.NATS, Errors]:
    errors = Errors()
    nc = await nats.connect(url, error_cb=errors.record, allow_reconnect=False, connect_timeout=5,
                            inbox_prefix=nats_auth.inbox_prefix_of_url(url))
    return nc, errors


async def wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.02)
