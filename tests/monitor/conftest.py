from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.monitor.config import MonitorConfig
from services.monitor.entrypoints.app import create_monitor
from services.monitor.service_layer.monitor import Monitor
from shared.service import Service
from tests.monitor.script import Publisher
from tests.support.helpers import eventually, settings_for
from tests.support.live import serve_on_loop


class Http:
    """A real uvicorn on a free port, on the test's event loop (the service's NATS connection lives there)."""

    def __init__(self, app) -> None:
        self.serving = serve_on_loop(app)

    async def __aenter__(self) -> httpx.AsyncClient:
        self.url = await self.serving.__aenter__()
        self.client = httpx.AsyncClient(base_url=self.url, timeout=10)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self.serving.__aexit__(*exc)


@dataclass
class Running:
    service: Service
    monitor: Monitor
    publisher: Publisher
    http: httpx.AsyncClient
    url: str


def fast_config(**overrides) -> MonitorConfig:
    return MonitorConfig(evaluate_every_s=0.05, push_every_s=0.2, poll_ledger_every_s=0.2, **overrides)


@pytest.fixture
def monitor_config() -> MonitorConfig:
    return fast_config()


@pytest.fixture
async def running(nats_server, tmp_path: Path, monitor_config: MonitorConfig) -> AsyncIterator[Running]:
    service = create_monitor(settings_for("monitor", nats_server.url, tmp_path), monitor_config)
    publisher = await Publisher.connect(nats_server.url)
    async with service.running():
        async with Http(service.http) as http:
            server = Running(service, service.part(Monitor), publisher, http, str(http.base_url).rstrip("/"))
            yield server
    await publisher.close()


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    await eventually(predicate, timeout=timeout, what=what)
