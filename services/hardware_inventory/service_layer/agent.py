"""The agent role: probe this machine, announce it (node.registered), then send heartbeats.

The node's identity is the data dir's node id (stable across restarts) unless a scripted probe
names one. The agent re-announces itself every ``REANNOUNCE_EVERY`` beats, so a registry whose state
was wiped learns the node again without a restart of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from services.hardware_inventory.adapters.probe import ProbeResult, ProbeSource
from shared.events import (
    DeployReady, DeployReleased, DeployUnloaded, Event, ModelLoaded, ModelUnloaded, NodeHeartbeat, NodeRegistered,
)

log = logging.getLogger(__name__)
REANNOUNCE_EVERY = 60


class Agent:
    def __init__(
        self, source: ProbeSource, node_id: str, publish: Callable[..., Awaitable[object]], interval_s: float
    ) -> None:
        self.source = source
        self.default_node_id = node_id
        self.publish = publish
        self.interval_s = interval_s
        self.loaded: set[str] = set()  # deployment ids ready on this node (from the worker's events)
        self.beats = 0
        self._task: asyncio.Task[None] | None = None
        self._static_facts: tuple | None = None

    @property
    def node_id(self) -> str:
        return self._node_id

    async def start(self) -> None:
        first = await asyncio.to_thread(self.source.probe)
        self._node_id = first.node_id or self.default_node_id
        await self.announce(first)
        self._task = asyncio.create_task(self._beat_forever(), name=f"heartbeats:{self._node_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def announce(self, probe: ProbeResult) -> None:
        self._static_facts = _facts(probe)
        await self.publish(
            NodeRegistered(
                node_id=self._node_id,
                hostname=probe.hostname,
                cpu_model=probe.cpu_model,
                cpu_cores=probe.cpu_cores,
                ram_total=probe.ram_total,
                devices=probe.devices(),
                labels=probe.labels,
                disk_total=probe.disk_total,
                disk_free=probe.disk_free,
                heartbeat_interval_s=self.interval_s,
            )
        )

    async def beat(self) -> None:
        probe = await asyncio.to_thread(self.source.probe)
        self.beats += 1
        if _facts(probe) != self._static_facts or self.beats % REANNOUNCE_EVERY == 0:
            await self.announce(probe)  # a GPU appeared or vanished, or a label changed
        await self.publish(
            NodeHeartbeat(
                node_id=self._node_id,
                ram_free=probe.ram_free,
                devices=probe.devices(),
                utilisation=probe.utilisation,
                loaded_models=sorted(self.loaded),
            )
        )

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception as exc:  # a failed probe or publish must not end the heartbeats
                log.warning("heartbeat of %s failed: %s", self._node_id, exc)

    async def on_deploy_event(self, event: Event) -> None:
        data = event.data
        if getattr(data, "node_id", None) != self._node_id:
            return
        if isinstance(data, ModelLoaded) or (isinstance(data, DeployReady) and not data.on_demand):
            self.loaded.add(data.deployment_id)
        elif isinstance(data, (DeployUnloaded, DeployReleased, ModelUnloaded)):
            self.loaded.discard(data.deployment_id)


def _facts(probe: ProbeResult) -> tuple:
    return (
        probe.hostname,
        probe.cpu_model,
        probe.cpu_cores,
        probe.ram_total,
        tuple(sorted(probe.labels.items())),
        tuple((g.id, g.name, g.uuid, g.memory_total) for g in probe.gpus),
    )
