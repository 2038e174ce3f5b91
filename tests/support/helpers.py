"""Small helpers for tests that run services against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from shared.config import Settings
from shared.service import Service


def make_service(name: str, nats_url: str, data_dir: Path, node_id: str = "node-t") -> Service:
    """A service as `strata up` would build it, connected to the test's NATS, with no HTTP port."""
    from shared.service import load

    return load(name, settings_for(name, nats_url, data_dir, node_id))


def settings_for(name: str, nats_url: str, data_dir: Path, node_id: str = "node-t") -> Settings:
    return Settings(service=name, nats_url=nats_url, data_dir=data_dir, node_id=node_id, http_port=0)


async def flushed(nc) -> None:  # type: ignore[no-untyped-def]
    """``nc.flush()`` that keeps its promise: everything sent before it has reached the server. nats-py
    2.16 writes flush()'s PING straight to the socket, ahead of SUB/PUB commands still waiting for its
    flusher task, so the PONG could come back before a SUB arrived: a request then met "no responders"
    (seen in about 1 of 300 subscribe-flush-request rounds; it was #26's intermittent test_cli.py)."""
    await nc._flush_pending(force_flush=True)  # the pending commands are on the socket
    await nc.flush()


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until predicate() is truthy; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
