"""On-demand residency without NATS or a model: keep-alive expiry on an injected clock, the LRU choice,
in-flight protection, one shared load for concurrent first requests, the load time-out and load failure."""

from __future__ import annotations

import asyncio

import pytest

from shared import errors
from shared.events import MeasuredMemory, ModelLoaded, ModelLoadFailed, ModelUnloaded
from services.inference_worker.service_layer.deployments import Deployment
from services.inference_worker.service_layer.residency import Budget, Residency, expired, footprint, victims
from tests.inference_worker.conftest import model_id

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loop:
    runtime = "strata-engine"


class FakeDeployments:
    """What Residency uses of Deployments; a load can be held (``gate``) or made to fail (``fail``)."""

    def __init__(self) -> None:
        self.by_key: dict[str, Deployment] = {}
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.loads: list[str] = []
        self.unloads: list[str] = []

    def add(self, name: str, booked: int, *, keep_alive_s: float = 60.0, on_demand: bool = True) -> Deployment:
        dep = Deployment(
            key=f"dep-{name}/0",
            deployment_id=f"dep-{name}",
            replica=0,
            generation=0,
            model=model_id(name),
            device="cpu",
            state="ready",
            on_demand=on_demand,
            keep_alive_s=keep_alive_s,
            booked_bytes=booked,
        )
        self.by_key[dep.key] = dep
        return dep

    def pick(self, ref):
        for dep in self.by_key.values():
            if dep.model.name == ref.name:
                return dep
        raise errors.NotFound(f"{ref} is not deployed")

    async def load_resident(self, dep: Deployment) -> None:
        self.loads.append(dep.deployment_id)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        dep.loop, dep.measured = (
            Loop(),
            MeasuredMemory(weights=dep.booked_bytes // 2, kv_cache=0, peak=dep.booked_bytes),
        )

    async def unload_resident(self, dep: Deployment) -> None:
        self.unloads.append(dep.deployment_id)
        dep.loop = None


@pytest.fixture
def setup():
    deployments, events, clock = FakeDeployments(), [], Clock()

    async def publish(data) -> None:
        events.append(data)

    def make(budget: int = 100 * MB, **kw) -> Residency:
        return Residency(deployments, publish, "node-a", Budget(budget), clock=clock, **kw)  # type: ignore[arg-type]

    return deployments, events, clock, make


def resident(deployments: FakeDeployments, name: str, booked: int, last_used: float, inflight: int = 0) -> Deployment:
    dep = deployments.add(name, booked)
    dep.loop, dep.last_used = Loop(), last_used
    dep.inflight.update(f"r{i}" for i in range(inflight))
    return dep


# ---- the policy --------------------------------------------------------------------------
def test_the_least_recently_used_idle_ones_are_chosen_until_the_load_fits():
    d = FakeDeployments()
    old, mid, new = resident(d, "old", 40, 1.0), resident(d, "mid", 40, 2.0), resident(d, "new", 40, 3.0)
    assert victims(30, 30, [new, old, mid]) == []  # it fits already
    assert victims(50, 20, [new, old, mid]) == [old]
    assert victims(90, 20, [new, old, mid]) == [old, mid]


def test_a_model_with_a_request_in_flight_is_never_chosen():
    d = FakeDeployments()
    busy, idle = resident(d, "busy", 40 * MB, 1.0, inflight=1), resident(d, "idle", 40 * MB, 2.0)
    assert victims(50 * MB, 20 * MB, [busy, idle]) == [idle]  # the older one is busy: the younger goes
    with pytest.raises(
        errors.Unavailable,
        match=r"it needs 104.9 MB, and 62.9 MB would be free with every idle on-demand "
        r"model unloaded \(busy ones, never evicted: busy:1 \(1 in flight\)\)",
    ):
        victims(100 * MB, 20 * MB, [busy, idle])


def test_keep_alive_expiry_counts_from_the_last_use_and_not_while_busy():
    d = FakeDeployments()
    a, b = resident(d, "a", 1, 100.0), resident(d, "b", 1, 100.0, inflight=1)
    a.keep_alive_s = b.keep_alive_s = 5.0
    assert expired([a, b], 104.9) == []
    assert expired([a, b], 105.0) == [a]


def test_the_footprint_is_the_booking_until_measured():
    dep = FakeDeployments().add("m", 7 * MB)
    assert footprint(dep) == 7 * MB
    dep.measured = MeasuredMemory(weights=1, kv_cache=1, peak=5 * MB)
    assert footprint(dep) == 5 * MB


# ---- the residency -----------------------------------------------------------------------
async def test_concurrent_first_requests_share_one_load_and_it_is_announced(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)
    residency = make()
    deployments.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(residency.hold_loaded(dep, f"r{i}")) for i in range(3)]
    await asyncio.sleep(0)
    deployments.gate.set()
    await asyncio.gather(*waiting)
    assert deployments.loads == ["dep-m"] and dep.loop is not None and not dep.inflight
    [loaded] = [e for e in events if isinstance(e, ModelLoaded)]
    assert loaded.deployment_id == "dep-m" and loaded.request_id == "r0" and loaded.measured.peak == 10 * MB


async def test_idle_past_keep_alive_unloads_and_the_next_request_loads_again(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB, keep_alive_s=30.0)
    residency = make()
    await residency.load_for("m", "r1")
    clock.now += 29.0
    assert await residency.reap() == [] and dep.loop is not None
    residency.touch(dep)  # a request ended now
    clock.now += 29.0
    assert await residency.reap() == []
    clock.now += 1.0
    assert await residency.reap() == [dep] and dep.loop is None
    [unloaded] = [e for e in events if isinstance(e, ModelUnloaded)]
    assert (
        unloaded.reason == "idle" and unloaded.idle_seconds == pytest.approx(30.0) and unloaded.freed_bytes == 10 * MB
    )
    await residency.load_for("m", "r2")
    assert deployments.loads == ["dep-m", "dep-m"] and dep.loop is not None


async def test_a_model_in_use_is_not_unloaded_at_keep_alive(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB, keep_alive_s=1.0)
    residency = make()
    await residency.load_for("m", "r1")
    dep.inflight.add("long")
    clock.now += 100.0
    assert await residency.reap() == [] and dep.loop is not None


async def test_loading_a_second_model_evicts_the_least_recently_used(setup):
    deployments, events, clock, make = setup
    a, b, c = deployments.add("a", 40 * MB), deployments.add("b", 40 * MB), deployments.add("c", 40 * MB)
    residency = make(budget=100 * MB)
    await residency.load_for("a", "r1")
    clock.now += 1
    await residency.load_for("b", "r2")
    clock.now += 1
    residency.touch(a)  # a was used after b
    await residency.load_for("c", "r3")
    assert b.loop is None and a.loop is not None and c.loop is not None
    [evicted] = [e for e in events if isinstance(e, ModelUnloaded)]
    assert evicted.deployment_id == "dep-b" and evicted.reason == "evicted" and evicted.for_deployment == "dep-c"
    assert [e for e in events if isinstance(e, ModelLoaded)][-1].evicted == ["dep-b"]


async def test_no_eviction_of_a_busy_model_the_load_is_refused_with_the_reason(setup):
    deployments, events, clock, make = setup
    a, b = deployments.add("a", 60 * MB), deployments.add("b", 60 * MB)
    residency = make(budget=100 * MB)
    await residency.load_for("a", "r1")
    a.inflight.add("streaming")
    with pytest.raises(errors.Unavailable, match=r"not enough memory.*a:1 \(1 in flight\)"):
        await residency.load_for("b", "r2")
    assert a.loop is not None and b.loop is None and not b.inflight
    [failed] = [e for e in events if isinstance(e, ModelLoadFailed)]
    assert failed.deployment_id == "dep-b" and "not enough memory" in failed.reason and failed.request_id == "r2"


async def test_a_failed_load_is_a_clear_error_and_leaves_nothing_loaded(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)
    residency = make()
    deployments.fail = RuntimeError("model.safetensors is truncated")
    with pytest.raises(
        errors.ModelLoadFailed, match="could not load m:1 on node-a: RuntimeError: model.safetensors is truncated"
    ):
        await residency.load_for("m", "r1")
    assert dep.loop is None and not dep.inflight and residency.resident() == []
    assert [e.reason for e in events if isinstance(e, ModelLoadFailed)] == [
        "RuntimeError: model.safetensors is truncated"
    ]
    deployments.fail = None  # fixed: the next request loads it
    await residency.load_for("m", "r2")
    assert dep.loop is not None


async def test_a_load_past_the_time_out_answers_model_loading_and_goes_on(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)
    residency = make(load_timeout_s=0.05)
    deployments.gate = asyncio.Event()
    ticks = []

    async def tick() -> None:
        ticks.append(1)

    with pytest.raises(errors.ModelLoading, match=r"m:1 is still loading on node-a after 0.05s"):
        await residency.load_for("m", "r1", tick)
    assert dep.loop is None and not dep.inflight
    deployments.gate.set()
    await residency.load_for("m", "r2")  # joins the load that went on
    assert deployments.loads == ["dep-m"] and dep.loop is not None


async def test_keepalive_ticks_while_a_load_is_awaited(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)
    residency = make()
    deployments.gate = asyncio.Event()
    ticked = asyncio.Event()

    async def tick() -> None:
        ticked.set()

    waiting = asyncio.ensure_future(residency.ensure_loaded(dep, "r1", tick, tick_s=0.01))
    await ticked.wait()  # a tick came while the load was held
    deployments.gate.set()
    await waiting
    assert dep.loop is not None


async def test_undeployed_while_loading_is_unloaded_when_the_load_ends(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)
    residency = make()
    deployments.gate = asyncio.Event()
    waiting = asyncio.ensure_future(residency.load_for("m", "r1"))
    await asyncio.sleep(0)
    del deployments.by_key[dep.key]  # undeploy took it
    deployments.gate.set()
    with pytest.raises(errors.Unavailable, match="unloaded on node-a while loading"):
        await waiting
    assert dep.loop is None and deployments.unloads == ["dep-m"]
    assert not [e for e in events if isinstance(e, ModelLoaded)]


async def test_always_on_deployments_are_not_residency_s_business(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB, on_demand=False)
    dep.loop = Loop()
    residency = make(budget=1)
    assert residency.resident() == []
    clock.now += 10_000
    assert await residency.reap() == []


def test_a_warm_up_that_fails_closes_the_half_built_engine():
    """llama.cpp's memory is not the GC's: a load that fails after the engine was built frees it by hand."""
    from types import SimpleNamespace

    from services.inference_worker.service_layer.deployments import Deployments

    closed = []

    class Broken:
        can_generate = True

        def generate(self, prompts, params):
            return [SimpleNamespace(finish_reason="error", error="ggml_abort")]

        def close(self) -> None:
            closed.append(True)

    deployments = Deployments("node-a", None, None, None)  # type: ignore[arg-type]
    deployments._engine = lambda artifact, event: Broken()  # type: ignore[method-assign]
    scheduled = SimpleNamespace(device="cpu")
    with pytest.raises(RuntimeError, match="warm-up generation failed: ggml_abort"):
        deployments._load(SimpleNamespace(model=model_id("m")), scheduled)  # type: ignore[arg-type]
    assert closed == [True]


async def test_a_model_a_request_reaches_during_an_eviction_is_not_evicted_after_all(setup):
    """Eviction picks one victim at a time: the next one is chosen again after each unload."""
    deployments, events, clock, make = setup
    a, b, c = deployments.add("a", 40 * MB), deployments.add("b", 40 * MB), deployments.add("c", 80 * MB)
    residency = make(budget=100 * MB)
    await residency.load_for("a", "r1")
    clock.now += 1
    await residency.load_for("b", "r2")
    original = deployments.unload_resident

    async def unload_then_b_gets_a_request(dep):
        await original(dep)
        b.inflight.add("arrived-meanwhile")  # while a was unloading

    deployments.unload_resident = unload_then_b_gets_a_request  # type: ignore[method-assign]
    with pytest.raises(errors.Unavailable, match="busy ones, never evicted: b:1"):
        await residency.load_for("c", "r3")
    assert a.loop is None and b.loop is not None and c.loop is None


async def test_a_load_whose_event_cannot_be_published_still_answers(setup):
    deployments, events, clock, make = setup
    dep = deployments.add("m", 10 * MB)

    async def nats_away(_data) -> None:
        raise ConnectionError("nats: connection closed")

    residency = Residency(deployments, nats_away, "node-a", Budget(100 * MB), clock=clock)  # type: ignore[arg-type]
    await residency.load_for("m", "r1")
    assert dep.loop is not None


class Device:
    """A device whose free memory is what the resident on-demand models leave of ``total`` (as LiveMemory
    reads it): an always-on load draws on it too."""

    shared_with_always_on = True

    def __init__(self, total: int) -> None:
        self.total = total

    def free(self, device: str, resident: list[Deployment]) -> int:
        return self.total - sum(footprint(d) for d in resident)


async def test_an_always_on_load_evicts_idle_on_demand_models_it_needs_the_memory_of(setup):
    deployments, events, clock, make = setup
    a, b = deployments.add("a", 40 * MB), deployments.add("b", 40 * MB)
    residency = Residency(deployments, lambda e: _append(events, e), "node-a", Device(100 * MB), clock=clock)  # type: ignore[arg-type]
    await residency.load_for("a", "r1")
    clock.now += 1
    await residency.load_for("b", "r2")
    await residency.room_for_always_on("cpu", 50 * MB, "dep-big")
    assert a.loop is None and b.loop is not None  # the least recently used made way, and only it
    [evicted] = [e for e in events if isinstance(e, ModelUnloaded)]
    assert evicted.reason == "evicted" and evicted.for_deployment == "dep-big"
    b.inflight.add("busy")
    await residency.room_for_always_on("cpu", 90 * MB, "dep-bigger")  # busy: not evicted, and the load goes ahead
    assert b.loop is not None


async def test_a_fixed_on_demand_budget_is_not_the_always_on_models_business(setup):
    deployments, events, clock, make = setup
    a = deployments.add("a", 40 * MB)
    residency = make(budget=50 * MB)
    await residency.load_for("a", "r1")
    await residency.room_for_always_on("cpu", 10_000 * MB, "dep-big")
    assert a.loop is not None


async def _append(events: list, event) -> None:
    events.append(event)
