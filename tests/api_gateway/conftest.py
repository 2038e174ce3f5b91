"""The gateway served for real (uvicorn on a free port, in a thread with its own event loop) against
the test's nats-server, with scripted workers in the test's loop, and the official openai client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.api_gateway.entrypoints.app import create_service
from services.api_gateway.config import GatewayConfig
from shared.service import Service
from tests.support.fake_worker import FakeWorker, Script
from tests.support.helpers import settings_for
from tests.support.live import serve_in_thread

openai = pytest.importorskip("openai")


@dataclass
class RunningGateway:
    service: Service
    base_url: str

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, api_key: str = "sk-none", **kwargs: object) -> openai.AsyncOpenAI:
        # max_retries=0: a test of 429/503 must see the first answer, not the client's retries
        return openai.AsyncOpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=30, **kwargs)


@contextmanager
def serve_gateway(nats_url: str, data_dir: Path, config: GatewayConfig) -> Iterator[RunningGateway]:
    service = create_service(settings_for("api-gateway", nats_url, data_dir), config)
    with serve_in_thread(service.http, "the gateway") as base_url:
        yield RunningGateway(service=service, base_url=base_url)


TEST_CONFIG = GatewayConfig(silence_timeout_s=1.0, request_timeout_s=30)


@pytest.fixture
def gateway_factory(nats_server, tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    stack: list[object] = []

    def start(**overrides: object) -> RunningGateway:
        ctx = serve_gateway(nats_server.url, tmp_path / f"gw{len(stack)}", TEST_CONFIG.model_copy(update=overrides))
        stack.append(ctx)
        return ctx.__enter__()

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
def gateway(gateway_factory) -> RunningGateway:
    return gateway_factory()


@pytest.fixture
async def workers(nats_server) -> AsyncIterator[Callable[..., object]]:
    started: list[FakeWorker] = []

    async def start(models: dict[str, Script] | None = None, **kwargs: object) -> FakeWorker:
        worker = await FakeWorker(nats_server.url, models or {"tiny": Script()}, **kwargs).start()  # type: ignore[arg-type]
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.stop()
