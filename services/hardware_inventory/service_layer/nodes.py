"""The registry's node table: registration, live heartbeats, lost and returned nodes.

Each registry replica hears every heartbeat (core NATS, no queue group) and judges liveness on its
own; the lost/returned transition itself is a compare-and-set on the node's record, so exactly one
replica wins it and publishes node.lost / node.returned and moves the node's deployments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from services.hardware_inventory.adapters.state import InventoryState, Unchanged, node_key
from services.hardware_inventory.domain.model import Telemetry
from shared.events import EventData, NodeHeartbeat, NodeLost, NodeRegistered, NodeReturned, utcnow
from shared.inventory import NodeRecord

log = logging.getLogger(__name__)
Publish = Callable[..., Awaitable[object]]


class NodeTable:
    def __init__(
        self, state: InventoryState, publish: Publish, missed_beats: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.state = state
        self.publish = publish
        self.missed_beats = missed_beats
        self.clock = clock
        self.telemetry: dict[str, Telemetry] = {}
        self.started = clock()  # a node not heard since this replica started is judged from here
        self.on_lost: list[Callable[[str], Awaitable[None]]] = []
        self.on_available: list[Callable[[], Awaitable[None]]] = []

    async def registered(self, event: NodeRegistered) -> None:
        def upsert(current: NodeRecord | None) -> tuple[NodeRecord, bool]:
            returned = current is not None and current.status == "lost"
            record = NodeRecord(
                node_id=event.node_id,
                hostname=event.hostname,
                cpu_model=event.cpu_model,
                cpu_cores=event.cpu_cores,
                ram_total=event.ram_total,
                disk_total=event.disk_total,
                disk_free=event.disk_free,
                devices=event.devices,
                labels=event.labels,
                heartbeat_interval_s=event.heartbeat_interval_s,
                status="alive",
                registered_at=current.registered_at if current else utcnow(),
                status_since=utcnow() if returned or current is None else current.status_since,
            )
            return record, returned

        returned = await self.state.change(node_key(event.node_id), NodeRecord, upsert)
        self._heard(event.node_id, None)
        if returned:
            await self._publish(NodeReturned(node_id=event.node_id), f"returned.{event.node_id}.{time.time_ns()}")
        for hook in self.on_available:
            await hook()

    async def heartbeat(self, beat: NodeHeartbeat) -> None:
        self._heard(beat.node_id, beat)
        record = await self.state.node(beat.node_id)
        if record is not None and record.status == "lost":
            await self._mark_returned(beat.node_id)

    def _heard(self, node_id: str, beat: NodeHeartbeat | None) -> None:
        previous = self.telemetry.get(node_id)
        if beat is None:
            if previous is not None:
                self.telemetry[node_id] = previous.model_copy(update={"received_at": self.clock()})
            else:
                self.telemetry[node_id] = Telemetry(ram_free=0, received_at=self.clock())
            return
        self.telemetry[node_id] = Telemetry(
            ram_free=beat.ram_free,
            devices={d.id: d for d in beat.devices},
            utilisation=beat.utilisation,
            loaded_models=beat.loaded_models,
            received_at=self.clock(),
        )

    async def _mark_returned(self, node_id: str) -> None:
        def back(current: NodeRecord | None) -> tuple[NodeRecord, str]:
            if current is None or current.status != "lost":
                raise Unchanged(None)
            return current.model_copy(
                update={"status": "alive", "status_since": utcnow()}
            ), current.status_since.isoformat()

        lost_since = await self.state.change(node_key(node_id), NodeRecord, back)
        if lost_since is not None:
            log.info("node %s returned", node_id)
            await self._publish(NodeReturned(node_id=node_id), f"returned.{node_id}.{lost_since}")
            for hook in self.on_available:
                await hook()

    async def check(self) -> list[str]:
        """Mark every node lost that missed ``missed_beats`` heartbeats; returns the ones this replica marked."""
        now = self.clock()
        marked = []
        for node in await self.state.nodes():
            if node.status != "alive":
                continue
            live = self.telemetry.get(node.node_id)
            last = live.received_at if live else self.started
            silent = now - last
            missed = int(silent / node.heartbeat_interval_s)
            if missed < self.missed_beats:
                continue
            if await self._mark_lost(node.node_id, missed, silent):
                marked.append(node.node_id)
        return marked

    async def _mark_lost(self, node_id: str, missed: int, silent: float) -> bool:
        def lose(current: NodeRecord | None) -> tuple[NodeRecord, str]:
            if current is None or current.status != "alive":
                raise Unchanged(None)
            return current.model_copy(
                update={"status": "lost", "status_since": utcnow()}
            ), current.status_since.isoformat()

        alive_since = await self.state.change(node_key(node_id), NodeRecord, lose)
        if alive_since is None:
            return False  # another replica marked it first
        log.warning("node %s lost after %d missed heartbeats", node_id, missed)
        last_seen = utcnow() - timedelta(seconds=silent)
        await self._publish(
            NodeLost(node_id=node_id, last_seen=last_seen, missed_beats=missed), f"lost.{node_id}.{alive_since}"
        )
        for hook in self.on_lost:
            await hook(node_id)
        return True

    async def _publish(self, data: EventData, event_id: str) -> None:
        await self.publish(data, event_id=_safe_id(event_id))


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:128]
