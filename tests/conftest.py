from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import os

import pytest
from hypothesis import settings

from tests.support.nats import ContainerNats, NatsServer, backend

# CI (CI=true, as .ci/run runs) draws the same hypothesis examples every run, so a failure there can be
# reproduced; elsewhere the examples vary, to find new ones. HYPOTHESIS_PROFILE picks either by name.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

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
