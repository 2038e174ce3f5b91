"""On-demand deployments (``strata deploy --on-demand``): which of them are in memory.

An on-demand deployment serves its name from deploy time (the worker holds its request subject) but
loads no weights until a request arrives. That request waits for the load (``load_timeout_s``, then a
``model_loading`` error while the load goes on). A loaded one is unloaded once no request is in flight
and none came for its keep-alive; when a load needs memory, the least recently used loaded on-demand
deployment with no request in flight is unloaded first. Always-on deployments are never touched.

The policy (``victims``, ``expired``) is plain functions over the deployments and a clock; the
``Residency`` around it does the loads and unloads through ``Deployments`` and publishes
deploy.model_loaded / deploy.model_unloaded / deploy.model_load_failed. No NATS here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from shared import errors
from shared.catalog import parse_ref
from shared.host_memory import available_bytes
from shared.events import ModelLoaded, ModelLoadFailed, ModelUnloaded, UnloadReason
from shared.inference import KEEPALIVE_S
from services.inference_worker.service_layer.deployments import Deployment, Deployments, Publish, failure_reason

log = logging.getLogger(__name__)
Clock = Callable[[], float]
LOAD_TIMEOUT_S = 120.0


class Memory(Protocol):
    shared_with_always_on: bool  # True: always-on loads draw on the same memory (they evict idle on-demand ones too)

    def free(self, device: str, resident: list[Deployment]) -> int:
        """Bytes a load may use on ``device`` now, with ``resident`` the on-demand models loaded there."""
        ...


class Budget:
    """A fixed share of the device for on-demand models (the worker's ``ondemand_memory_bytes``)."""

    shared_with_always_on = False

    def __init__(self, bytes_: int) -> None:
        self.bytes = bytes_

    def free(self, device: str, resident: list[Deployment]) -> int:
        return self.bytes - sum(footprint(d) for d in resident)


class LiveMemory:
    """What the device has free now (the loaded models are already out of it): RAM for the CPU, the
    CUDA allocator's free memory for a GPU."""

    shared_with_always_on = True

    def free(self, device: str, resident: list[Deployment]) -> int:
        if device.startswith("cuda"):
            import torch

            return torch.cuda.mem_get_info(torch.device(device))[0]
        return available_bytes()


def footprint(dep: Deployment) -> int:
    """What the deployment holds (or will) on its device: its measured peak once it was loaded, the
    fit's booking (what hardware-inventory predicted, runtime overhead included) before that."""
    return dep.measured.peak if dep.measured is not None and dep.measured.peak > 0 else dep.booked_bytes


def victims(need: int, free: int, resident: Iterable[Deployment]) -> list[Deployment]:
    """The least recently used loaded on-demand deployments to unload so that ``need`` fits in ``free``
    (``free`` counted before unloading them). Busy ones (a request in flight) are never chosen.
    Raises Unavailable, naming what holds the memory, when unloading every idle one would not do."""
    chosen: list[Deployment] = []
    for dep in sorted((d for d in resident if not d.inflight), key=lambda d: d.last_used):
        if need <= free:
            break
        chosen.append(dep)
        free += footprint(dep)
    if need > free:
        busy = [d for d in resident if d.inflight]
        held = ", ".join(f"{d.model.name}:{d.model.version} ({len(d.inflight)} in flight)" for d in busy) or "none"
        raise errors.Unavailable(
            f"not enough memory to load it: it needs {_mb(need)}, and {_mb(max(free, 0))} would be free "
            f"with every idle on-demand model unloaded (busy ones, never evicted: {held})"
        )
    return chosen


def expired(resident: Iterable[Deployment], now: float) -> list[Deployment]:
    """Loaded on-demand deployments idle for their keep-alive: nothing in flight, and the last request
    ended (or the load finished) at least ``keep_alive_s`` ago."""
    return [d for d in resident if not d.inflight and now - d.last_used >= d.keep_alive_s]


class Residency:
    def __init__(
        self,
        deployments: Deployments,
        publish: Publish,
        node_id: str,
        memory: Memory | None = None,
        *,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        clock: Clock = time.monotonic,
        tick_s: float = 0.25,
    ) -> None:
        self.deployments, self.publish, self.node_id = deployments, publish, node_id
        self.memory = memory or LiveMemory()
        self.load_timeout_s, self.clock, self.tick_s = load_timeout_s, clock, tick_s
        self._lock = asyncio.Lock()  # one load (and its evictions) at a time: memory figures must not mix
        self._loads: dict[str, asyncio.Task[None]] = {}  # deployment key -> its load
        self._reaper: asyncio.Task[None] | None = None

    # ---- queries ------------------------------------------------------------------------
    def resident(self, device: str | None = None) -> list[Deployment]:
        return [
            d
            for d in self.deployments.by_key.values()
            if d.on_demand and d.loop is not None and d.state == "ready" and (device is None or d.device == device)
        ]

    def touch(self, dep: Deployment) -> None:
        """A request started or ended: the keep-alive counts from now."""
        dep.last_used = self.clock()

    # ---- loading ------------------------------------------------------------------------
    async def load_for(
        self, model_ref: str, request_id: str, on_tick: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Before a request runs: load the on-demand deployment it would pick, if it is not loaded.
        A ref no deployment serves is left for the request's own path to refuse."""
        try:
            dep = self.deployments.pick(parse_ref(model_ref))
        except errors.StrataError:
            return
        if dep.loop is None:
            await self.hold_loaded(dep, request_id, on_tick)

    async def hold_loaded(
        self, dep: Deployment, request_id: str, on_tick: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """``ensure_loaded`` with the request counted in flight meanwhile."""
        dep.inflight.add(request_id)
        try:
            await self.ensure_loaded(dep, request_id, on_tick)
        finally:
            dep.inflight.discard(request_id)

    async def ensure_loaded(
        self,
        dep: Deployment,
        request_id: str | None = None,
        on_tick: Callable[[], Awaitable[None]] | None = None,
        tick_s: float = KEEPALIVE_S,
    ) -> None:
        """Return once ``dep`` is loaded; its caller must already count in ``dep.inflight`` (so it is
        not evicted the moment it is loaded). Concurrent first requests wait on one load. Raises
        ModelLoadFailed (the reason) or ModelLoading (past ``load_timeout_s``; the load goes on)."""
        self.touch(dep)
        if dep.loop is not None or not dep.on_demand:
            return
        task = self._loads.get(dep.key)
        if task is None:
            task = self._loads[dep.key] = asyncio.ensure_future(self._load(dep, request_id))
            task.add_done_callback(lambda t, key=dep.key: (self._loads.pop(key, None), t.cancelled() or t.exception()))
        deadline = asyncio.get_running_loop().time() + self.load_timeout_s
        while not task.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise errors.ModelLoading(
                    f"{_name(dep)} is still loading on {self.node_id} after {self.load_timeout_s:g}s "
                    "(the worker's load time-out); the load goes on, retry shortly"
                )
            await asyncio.wait([task], timeout=min(tick_s, left))  # the load is shared: never cancelled by a caller
            if not task.done() and on_tick is not None:
                await on_tick()
        if (exc := task.exception()) is not None:
            raise exc
        if dep.loop is None:  # unloaded again in between (undeployed): the caller's pick fails next
            raise errors.Unavailable(f"{_name(dep)} was unloaded on {self.node_id} while loading, retry")
        self.touch(dep)

    async def _load(self, dep: Deployment, request_id: str | None) -> None:
        async with self._lock:
            if dep.loop is not None:
                return
            try:
                evicted = await self._make_room(dep.device, footprint(dep), dep.deployment_id)
                started = time.monotonic()
                await self.deployments.load_resident(dep)
            except Exception as exc:
                reason = exc.message if isinstance(exc, errors.StrataError) else failure_reason(exc)
                log.warning("on-demand load of %s failed: %s", _name(dep), reason)
                await self._tell(
                    ModelLoadFailed(
                        deployment_id=dep.deployment_id,
                        replica=dep.replica,
                        model=dep.model,
                        node_id=self.node_id,
                        reason=reason,
                        request_id=request_id,
                    )
                )
                if isinstance(exc, errors.Unavailable):
                    raise errors.Unavailable(f"cannot load {_name(dep)} on {self.node_id}: {reason}") from None
                raise errors.ModelLoadFailed(f"could not load {_name(dep)} on {self.node_id}: {reason}") from None
            seconds = time.monotonic() - started
            if dep.key not in self.deployments.by_key or dep.state != "ready":  # undeployed while it loaded
                await self.deployments.unload_resident(dep)
                return
            self.touch(dep)
            assert dep.loop is not None and dep.measured is not None
            log.info(
                "loaded on-demand %s in %.2fs%s",
                _name(dep),
                seconds,
                f" (evicted {', '.join(evicted)})" if evicted else "",
            )
            await self._tell(
                ModelLoaded(
                    deployment_id=dep.deployment_id,
                    replica=dep.replica,
                    model=dep.model,
                    node_id=self.node_id,
                    device=dep.device,
                    measured=dep.measured,
                    load_seconds=seconds,
                    runtime=dep.loop.runtime,
                    request_id=request_id,
                    evicted=evicted,
                )
            )

    async def _make_room(self, device: str, need: int, for_deployment: str) -> list[str]:
        """Unload the least recently used idle on-demand models until ``need`` fits; their ids."""
        evicted: list[str] = []
        while True:  # one victim at a time: a request may reach the next one while this one unloads
            resident = self.resident(device)
            chosen = victims(need, self.memory.free(device, resident), resident)
            if not chosen:
                return evicted
            await self.unload(chosen[0], "evicted", for_deployment=for_deployment)
            evicted.append(chosen[0].deployment_id)

    async def room_for_always_on(self, device: str, need: int, deployment_id: str) -> None:
        """Before an always-on deployment loads: evict idle on-demand models it needs the memory of.
        Its placement booked the memory, so it loads even if busy ones leave too little (said in the log)."""
        if not self.memory.shared_with_always_on:
            return
        async with self._lock:
            try:
                evicted = await self._make_room(device, need, deployment_id)
            except errors.Unavailable as exc:
                log.warning("loading %s without the room it needs: %s", deployment_id, exc.message)
                return
        if evicted:
            log.info("evicted %s for always-on %s", ", ".join(evicted), deployment_id)

    # ---- unloading ----------------------------------------------------------------------
    async def unload(self, dep: Deployment, reason: UnloadReason, for_deployment: str | None = None) -> None:
        """Free the model's memory; the deployment stays, serving its name, and the next request loads it."""
        if dep.loop is None:
            return
        idle = max(self.clock() - dep.last_used, 0.0)
        freed = footprint(dep)
        started = time.monotonic()
        await self.deployments.unload_resident(dep)
        seconds = time.monotonic() - started
        log.info("unloaded on-demand %s (%s, idle %.1fs) in %.2fs", _name(dep), reason, idle, seconds)
        await self._tell(
            ModelUnloaded(
                deployment_id=dep.deployment_id,
                replica=dep.replica,
                model=dep.model,
                node_id=self.node_id,
                device=dep.device,
                reason=reason,
                idle_seconds=idle,
                freed_bytes=freed,
                unload_seconds=seconds,
                for_deployment=for_deployment,
            )
        )

    async def reap(self) -> list[Deployment]:
        """Unload each loaded on-demand deployment past its keep-alive; returns them."""
        gone = []
        async with self._lock:  # not in the middle of a load's memory arithmetic
            for dep in expired(self.resident(), self.clock()):
                if not dep.inflight:  # re-checked: a request may have arrived while another unloaded
                    await self.unload(dep, "idle")
                    gone.append(dep)
        return gone

    async def _tell(self, event: ModelLoaded | ModelUnloaded | ModelLoadFailed) -> None:
        """Publish a load or unload; one that cannot be sent (NATS away) is logged, and the load or
        unload it reports stands: the request waiting on it is answered all the same."""
        try:
            await self.publish(event)
        except Exception:
            log.exception("could not publish %s for %s", event.TYPE, event.deployment_id)

    # ---- the keep-alive clock -----------------------------------------------------------
    def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.reap()
            except Exception:  # a failed unload is logged; the next tick tries again
                log.exception("idle unload failed")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await asyncio.gather(*self._loads.values(), return_exceptions=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _name(dep: Deployment) -> str:
    return f"{dep.model.name}:{dep.model.version}"
