from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats import ContainerNats, NatsServer, backend

# the fault suite's summary lines (tests/faults), printed by the controller at the end of the session
pytest_plugins = ["tests.faults.summary"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer | ContainerNats]:
    """A real NATS with JetStream for one test."""
    if backend() == "testcontainers":
        if shutil.which("docker") is None:
            pytest.skip("STRATA_TEST_NATS=testcontainers but no docker client here")
        try:
            server: NatsServer | ContainerNats = ContainerNats()
        except Exception as exc:  # no Docker engine answering
            pytest.skip(f"STRATA_TEST_NATS=testcontainers but Docker is not usable: {exc}")
    else:
        store = tmp_path / "nats"
        store.mkdir()
        server = NatsServer(store).start()
    try:
        yield server
    finally:
        server.stop()
