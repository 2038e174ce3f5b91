"""On-demand deployments in the registry: they book no memory (many share a node that fits one at a
time; its worker evicts), carry their keep-alive to the worker, and follow the worker's loads and
unloads (what `strata deployments` shows), learning from each load's measurement."""

from __future__ import annotations

import asyncio

from services.hardware_inventory.service_layer.registry import Registry
from shared import bus
from shared.events import DeployReady, MeasuredMemory, ModelLoaded, ModelUnloaded, Source, make_event
from shared.inventory import DeployRequest
from tests.hardware_inventory.conftest import Cluster
from tests.support.helpers import eventually

WORKER = Source(service="inference-worker", node="cpu-8")
ON_CPU_8 = {"node": "cpu-8", "device": "cpu"}


async def replica(cluster: Cluster, deployment_id: str):
    return (await cluster.registry.part(Registry).state.allocations()).deployments[deployment_id].replicas[0]


async def until(check, what: str, timeout: float = 10.0):
    async def poll():
        while not (found := await check()):
            await asyncio.sleep(0.05)
        return found

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def test_on_demand_replicas_share_a_node_and_follow_their_workers_loads(cluster: Cluster):
    always = [
        await cluster.deployments.deploy(DeployRequest(model_ref="small", constraints=ON_CPU_8)) for _ in range(4)
    ]
    fitting = sum(o.scheduled for o in always)
    assert 0 < fitting < 4  # always-on: the node holds only so many
    for o in always:
        if o.scheduled:
            await cluster.deployments.undeploy(None, o.deployment_id)
    lazy = [
        await cluster.deployments.deploy(
            DeployRequest(model_ref="small", constraints=ON_CPU_8, on_demand=True, keep_alive_s=30)
        )
        for _ in range(4)
    ]
    assert all(o.scheduled for o in lazy), [o.reason for o in lazy]  # they book nothing: the worker evicts
    allocations = await cluster.registry.part(Registry).state.allocations()
    assert allocations.booked("cpu-8", "cpu") == 0
    dep = lazy[0].deployment
    assert dep.on_demand and dep.keep_alive_s == 30
    await eventually(lambda: cluster.of("deploy.scheduled", deployment_id=dep.deployment_id), what="deploy.scheduled")
    scheduled = cluster.of("deploy.scheduled", deployment_id=dep.deployment_id)[0]
    assert scheduled.on_demand and scheduled.keep_alive_s == 30

    r = dep.replicas[0]
    zero = MeasuredMemory(weights=0, kv_cache=0, peak=0)
    await bus.publish(
        cluster.registry.broker,
        make_event(
            DeployReady(
                deployment_id=dep.deployment_id,
                model=dep.model,
                node_id=r.node_id,
                device=r.device,
                measured=zero,
                load_seconds=0,
                on_demand=True,
            ),
            WORKER,
        ),
    )
    ready = await until(lambda: _with(cluster, dep.deployment_id, status="ready"), "ready")
    assert ready.loaded is False and ready.measured_peak is None  # nothing measured, nothing learned: not loaded

    measured = MeasuredMemory(weights=r.predicted_bytes // 2, kv_cache=r.kv_cache_bytes, peak=r.predicted_bytes)
    await bus.publish(
        cluster.registry.broker,
        make_event(
            ModelLoaded(
                deployment_id=dep.deployment_id,
                model=dep.model,
                node_id=r.node_id,
                device=r.device,
                measured=measured,
                load_seconds=1.0,
                runtime="strata-engine",
            ),
            WORKER,
        ),
    )
    loaded = await until(lambda: _with(cluster, dep.deployment_id, loaded=True), "loaded")
    assert loaded.measured_peak == r.predicted_bytes and loaded.runtime == "strata-engine"
    await until(lambda: _corrections(cluster), "a correction learned from the load's measurement")

    await bus.publish(
        cluster.registry.broker,
        make_event(
            ModelUnloaded(
                deployment_id=dep.deployment_id, model=dep.model, node_id=r.node_id, device=r.device, reason="idle"
            ),
            WORKER,
        ),
    )
    unloaded = await until(lambda: _with(cluster, dep.deployment_id, loaded=False), "unloaded")
    assert unloaded.status == "ready"  # still deployed: the next request loads it


async def _with(cluster: Cluster, deployment_id: str, **fields):
    r = await replica(cluster, deployment_id)
    return r if all(getattr(r, k) == v for k, v in fields.items()) else None


async def _corrections(cluster: Cluster):
    return [c for c in await cluster.registry.part(Registry).state.corrections() if c.device_kind == "cpu"]


async def test_the_node_agent_counts_an_on_demand_model_as_loaded_only_while_it_is():
    from services.hardware_inventory.service_layer.agent import Agent
    from tests.inference_worker.conftest import model_id

    agent = Agent(None, "cpu-8", None, 5.0)  # type: ignore[arg-type]  # no probe or publish: only its bookkeeping
    agent._node_id = "cpu-8"
    model, zero = model_id("lazy"), MeasuredMemory(weights=0, kv_cache=0, peak=0)
    common = dict(deployment_id="lazy-1", model=model, node_id="cpu-8", device="cpu")
    await agent.on_deploy_event(
        make_event(DeployReady(**common, measured=zero, load_seconds=0, on_demand=True), WORKER)
    )
    assert agent.loaded == set()  # deployed, not loaded: its heartbeat does not list it
    await agent.on_deploy_event(make_event(ModelLoaded(**common, measured=zero, load_seconds=0.1), WORKER))
    assert agent.loaded == {"lazy-1"}
    await agent.on_deploy_event(make_event(ModelUnloaded(**common, reason="evicted"), WORKER))
    assert agent.loaded == set()
