"""The child processes of `strata up`: started, kept running, stopped, and checked for health.

Each child runs in its own process group and dies with the supervisor (PR_SET_PDEATHSIG), so neither
Ctrl-C nor SIGTERM nor a killed supervisor leaves an orphan behind. A child that crashes is restarted
with exponential back-off. Output lines are prefixed with the child's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0
BACKOFF_START_S, BACKOFF_MAX_S, STABLE_AFTER_S = 0.5, 30.0, 60.0
COLOURS = ["36", "32", "33", "35", "34", "31", "96", "92"]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    colour: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ProcessGroup:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.stopping = asyncio.Event()
        self.children: list[Child] = []
        self.tty = sys.stdout.isatty()

    def prefix(self, child: Child) -> str:
        label = f"{child.name:<18}|"
        return f"\033[{child.colour}m{label}\033[0m " if self.tty else f"{label} "

    def add(self, name: str, argv: list[str], env: dict[str, str], health_url: str) -> Child:
        """Start ``argv`` now, and again whenever it exits, until ``stop_all``."""
        child = Child(name, argv, env, health_url, COLOURS[len(self.children) % len(COLOURS)])
        self.children.append(child)
        child.tasks.append(asyncio.create_task(self._keep_alive(child)))
        return child

    async def wait_healthy(self, children: list[Child], timeout_s: float, verify: Any = True) -> list[Child]:
        """Returns the children still unhealthy when the time is up (empty when all are healthy)."""
        deadline = time.monotonic() + timeout_s
        pending = list(children)
        async with httpx.AsyncClient(timeout=1.0, verify=verify) as client:
            while pending and time.monotonic() < deadline and not self.stopping.is_set():
                for child in list(pending):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(child.health_url)).status_code == 200:
                            pending.remove(child)
                if pending:
                    await asyncio.sleep(0.2)
        return pending

    async def stop_all(self) -> None:
        self.stopping.set()
        for child in reversed(self.children):  # services first, NATS last
            proc = child.process
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                self.say(f"{self.prefix(child)}did not stop in {STOP_GRACE_S:.0f}s; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        for child in self.children:
            for task in child.tasks:
                task.cancel()
            await asyncio.gather(*child.tasks, return_exceptions=True)

    async def _pump(self, child: Child, stream: asyncio.StreamReader) -> None:
        prefix = self.prefix(child)
        while line := await stream.readline():
            sys.stdout.write(prefix + line.decode(errors="replace"))
            sys.stdout.flush()

    async def _spawn(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=child.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, process_group=0, preexec_fn=_die_with_parent,
        )
        child.started_at = time.monotonic()
        assert child.process.stdout is not None
        child.tasks.append(asyncio.create_task(self._pump(child, child.process.stdout)))

    async def _keep_alive(self, child: Child) -> None:
        backoff = BACKOFF_START_S
        while not self.stopping.is_set():
            await self._spawn(child)
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - child.started_at > STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            child.restarts += 1
            self.say(
                f"{self.prefix(child)}exited with code {code}; restarting in {backoff:.1f}s (restart {child.restarts})"
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
