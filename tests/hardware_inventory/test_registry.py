"""The registry on a real nats-server with three scripted agents: placement, rejection, races,
node loss, correction from measured figures, undeploy."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.hardware_inventory.service_layer.registry import Registry
from shared import bus
from shared.events import DeployReady, DeployRequested, MeasuredMemory, Source, make_event
from shared.inventory import DeployRequest, FitRequest
from tests.hardware_inventory.conftest import GB, MISSED_BEATS, Cluster
from tests.support.helpers import eventually

CLIENT = Source(service="cli", node="laptop")


async def deploy(c: Cluster, **kwargs):
    return await c.deployments.deploy(DeployRequest(**kwargs))


async def test_placement_follows_the_policy_and_the_constraints(cluster: Cluster):
    binpack = await deploy(cluster, model_ref="tiny", policy="binpack")
    spread = await deploy(cluster, model_ref="tiny", policy="spread")
    on_cpu = await deploy(cluster, model_ref="tiny", constraints={"device": "cpu"})
    on_h100 = await deploy(cluster, model_ref="small", constraints={"gpu.product": "H100"})
    zone_b = await deploy(cluster, model_ref="tiny", constraints={"label.zone": "b"})
    where = lambda o: [(r.node_id, r.device) for r in o.deployment.replicas]  # noqa: E731
    assert where(binpack) == [("gpu-24", "cuda:0")]  # the tightest GPU: keeps the H100 free for big models
    assert where(spread) == [("gpu-80", "cuda:0")]  # the largest free share
    assert where(on_cpu) == [("cpu-8", "cpu")]
    assert on_cpu.deployment.replicas[0].dtype == "bfloat16"  # a 16-bit checkpoint is served in 16 bits on CPU too
    assert where(on_h100) == [("gpu-80", "cuda:0")]
    assert where(zone_b) == [("gpu-24", "cuda:0")]
    two = await deploy(cluster, model_ref="tiny", replicas=3, policy="binpack")
    assert len({r.node_id for r in two.deployment.replicas}) == 3  # replicas go to distinct nodes first
    await eventually(lambda: len(cluster.of("deploy.scheduled")) == 8, what="8 deploy.scheduled events")
    scheduled = cluster.of("deploy.scheduled", deployment_id=on_h100.deployment_id)[0]
    assert (
        scheduled.node_id == "gpu-80"
        and scheduled.kv_cache_bytes > 0
        and scheduled.booked_bytes > scheduled.predicted_bytes
    )
    on_cpu_event = cluster.of("deploy.scheduled", deployment_id=on_cpu.deployment_id)[0]
    assert on_cpu_event.dtype is None and on_cpu_event.quantize is None  # the CPU worker picks its fastest 16-bit dtype


async def test_int8_is_booked_smaller_and_reaches_the_worker(cluster: Cluster):
    plain = await deploy(cluster, model_ref="tiny", constraints={"device": "cpu"})
    q8 = await deploy(cluster, model_ref="tiny", constraints={"device": "cpu"}, quantize="int8")
    assert q8.deployment.quantize == "int8"
    assert q8.deployment.replicas[0].predicted_bytes < plain.deployment.replicas[0].predicted_bytes
    await eventually(lambda: cluster.of("deploy.scheduled", deployment_id=q8.deployment_id), what="deploy.scheduled")
    assert cluster.of("deploy.scheduled", deployment_id=q8.deployment_id)[0].quantize == "int8"


async def test_live_free_memory_from_heartbeats_steers_placement_and_is_named_when_it_refuses(cluster: Cluster):
    """Something outside Strata holds 23.5 of gpu-24's 24 GB: the heartbeats say so, and placement listens."""
    import json

    path = cluster.tmp / "gpu-24.json"
    busy = json.loads(path.read_text())
    busy["gpus"][0]["memory_free"] = GB // 2
    path.write_text(json.dumps(busy))

    def heard() -> bool:
        device = cluster.registry.part(Registry).nodes.telemetry["gpu-24"].devices.get("cuda:0")
        return device is not None and device.memory_free == GB // 2

    await eventually(heard, what="a heartbeat with the little free memory")
    binpack = await deploy(cluster, model_ref="tiny", policy="binpack")
    assert [(r.node_id, r.device) for r in binpack.deployment.replicas] == [
        ("gpu-80", "cuda:0")
    ]  # not the tightest GPU now
    pinned = await deploy(cluster, model_ref="small", constraints={"node": "gpu-24", "device": "cuda"})
    assert not pinned.scheduled and pinned.code == "no_fit"
    assert "gpu-24/cuda:0: 0.50 GB free" in pinned.reason, pinned.reason


async def test_assigned_answers_a_starting_worker_with_what_its_node_holds(cluster: Cluster):
    from shared import rpc, subjects
    from shared.assignments import Assigned, AssignedRequest

    placed = await deploy(cluster, model_ref="tiny", replicas=2, policy="binpack")
    nodes = {r.node_id for r in placed.deployment.replicas}
    for node in ("cpu-8", "gpu-24", "gpu-80"):
        answer = await rpc.call(
            cluster.nc, subjects.rpc("hardware-inventory", "assigned"), AssignedRequest(node_id=node), Assigned
        )
        expected = [r for r in placed.deployment.replicas if r.node_id == node]
        assert [(s.deployment_id, s.replica, s.device, s.generation) for s in answer.scheduled] == [
            (placed.deployment_id, r.index, r.device, r.generation) for r in expected
        ], node
        assert all(
            s.kv_cache_bytes > 0 and s.context_length == placed.deployment.context_length for s in answer.scheduled
        )
    assert len(nodes) == 2


async def test_rejections_name_the_numbers_and_the_cause(cluster: Cluster):
    too_big = await deploy(cluster, model_ref="llama3-8b", constraints={"device": "cpu", "node": "cpu-8"})
    assert not too_big.scheduled and too_big.code == "no_fit"
    assert "needs" in too_big.reason and "GB on cpu" in too_big.reason
    assert "cpu-8/cpu: 6.80 GB free of 6.80 GB usable" in too_big.reason  # 85 % of 8 GB
    assert "gpu-24/cuda:0: excluded by device=cpu" in too_big.reason
    assert "gpu-80/cpu: excluded by node=cpu-8" in too_big.reason
    unknown = await deploy(cluster, model_ref="nope")
    assert unknown.code == "not_found" and "model 'nope' not found" in unknown.reason
    bad_key = await deploy(cluster, model_ref="tiny", constraints={"gpu.prodcut": "H100"})
    assert bad_key.code == "invalid" and "unknown constraint key 'gpu.prodcut'" in bad_key.reason
    bad_device = await deploy(cluster, model_ref="tiny", constraints={"device": "tpu"})
    assert "expected cpu, cuda or gpu" in bad_device.reason
    long_ctx = await deploy(cluster, model_ref="tiny", context_length=10**6)
    assert "exceeds the model's maximum of 2048" in long_ctx.reason
    await eventually(lambda: len(cluster.of("deploy.rejected")) == 5, what="5 deploy.rejected events")
    await cluster.store.broker.stop()  # model-store goes away
    down = await deploy(cluster, model_ref="tiny")
    assert down.code == "unavailable" and "model-store unavailable" in down.reason
    assert not (await cluster.registry.part(Registry).state.allocations()).deployments


async def test_concurrent_requests_never_book_the_same_memory_twice(cluster: Cluster):
    second = await cluster.start_registry()  # two registry replicas share the state and the durable consumer
    report = await cluster.deployments.fit(FitRequest(model_ref="llama3-8b", constraints={"device": "cuda"}))
    capacity = {(r.node_id, r.device): r.capacity for r in report.rows if r.kind == "cuda"}
    expected = sum(r.available // r.need for r in report.rows if r.kind == "cuda")
    assert expected == 4  # one on the 24 GB card, three on the 80 GB H100

    # half through the event stream (both replicas consume), half straight at both replicas at once
    events = [
        make_event(DeployRequested(model_ref="llama3-8b", constraints={"device": "cuda"}), CLIENT) for _ in range(10)
    ]
    direct = [
        (
            cluster.registries[i % 2]
            .part(Registry)
            .deployments.deploy(DeployRequest(model_ref="llama3-8b", constraints={"device": "cuda"}))
        )
        for i in range(10)
    ]
    outcomes = (await asyncio.gather(*(bus.publish(cluster.registry.broker, e) for e in events), *direct))[10:]
    await eventually(
        lambda: len(cluster.of("deploy.scheduled")) + len(cluster.of("deploy.rejected")) == 20,
        timeout=30,
        what="an answer to each of the 20 requests",
    )
    assert len(cluster.of("deploy.scheduled")) == expected
    assert sum(o.scheduled for o in outcomes) <= expected
    allocations = await cluster.registry.part(Registry).state.allocations()
    for (node, device), cap in capacity.items():
        assert allocations.booked(node, device) <= cap
    assert second.consumer.stats.handled + cluster.registry.consumer.stats.handled >= 10
    conflicts = cluster.registry.part(Registry).state.conflicts + second.part(Registry).state.conflicts
    print(f"compare-and-set conflicts resolved: {conflicts}")
    rejected = cluster.of("deploy.rejected")[0].reason
    assert "no device fits" in rejected and "free of" in rejected


async def test_a_lost_node_is_announced_and_its_deployments_move_then_it_returns(cluster: Cluster):
    outcome = await deploy(cluster, model_ref="llama3-8b")
    assert outcome.deployment.replicas[0].node_id == "gpu-24"
    await cluster.stop_agent("gpu-24")  # heartbeats stop
    await eventually(lambda: cluster.of("node.lost", node_id="gpu-24"), timeout=10, what="node.lost")
    lost = cluster.of("node.lost", node_id="gpu-24")[0]
    assert lost.missed_beats >= MISSED_BEATS
    await eventually(lambda: cluster.of("deploy.scheduled", generation=1), what="re-placement")
    moved = cluster.of("deploy.scheduled", generation=1)[0]
    assert (moved.deployment_id, moved.node_id, moved.device) == (outcome.deployment_id, "gpu-80", "cuda:0")
    released = cluster.of("deploy.released", deployment_id=outcome.deployment_id)
    assert released[0].node_id == "gpu-24" and "lost" in released[0].reason
    allocations = await cluster.registry.part(Registry).state.allocations()
    assert allocations.booked("gpu-24", "cuda:0") == 0 and allocations.booked("gpu-80", "cuda:0") > 0
    await cluster.start_agent("gpu-24")
    await eventually(lambda: cluster.of("node.returned", node_id="gpu-24"), timeout=10, what="node.returned")
    assert len(cluster.of("node.lost", node_id="gpu-24")) == 1


async def test_a_lost_node_whose_deployment_fits_nowhere_else_says_so(cluster: Cluster):
    outcome = await deploy(cluster, model_ref="small", constraints={"label.zone": "b"})
    await cluster.stop_agent("gpu-24")
    await eventually(
        lambda: cluster.of("deploy.rejected", deployment_id=outcome.deployment_id), timeout=10, what="rejection"
    )
    rejected = cluster.of("deploy.rejected", deployment_id=outcome.deployment_id)[0]
    assert (
        rejected.replica == 0
        and "cannot be placed again" in rejected.reason
        and "gpu-24/cuda:0: node lost" in rejected.reason
    )
    assert (await cluster.registry.part(Registry).state.allocations()).deployments[
        outcome.deployment_id
    ].state == "degraded"
    await cluster.start_agent("gpu-24")  # back: the waiting replica is placed again
    await eventually(
        lambda: cluster.of("deploy.scheduled", deployment_id=outcome.deployment_id, generation=1),
        timeout=10,
        what="the waiting replica placed on the returned node",
    )


async def test_measured_memory_corrects_the_next_prediction(cluster: Cluster):
    first = await deploy(cluster, model_ref="small", constraints={"gpu.product": "H100"})
    replica = first.deployment.replicas[0]
    predicted = replica.predicted_bytes
    fit_before = await cluster.deployments.fit(FitRequest(model_ref="small"))
    raw = fit_before.estimates["cuda"].raw
    weights = raw.weights
    # activations and workspace took half again what the formula said (the KV cache is as booked)
    measured = raw.weights + raw.kv_cache + int(1.5 * (raw.activations + raw.workspace))

    async def ready(outcome):
        r = outcome.deployment.replicas[0]
        event = make_event(
            DeployReady(
                deployment_id=outcome.deployment_id,
                model=outcome.deployment.model,
                node_id=r.node_id,
                device=r.device,
                load_seconds=1.5,
                measured=MeasuredMemory(weights=weights, kv_cache=r.kv_cache_bytes, peak=measured),
            ),
            Source(service="inference-worker", node=r.node_id),
        )
        await bus.publish(cluster.registry.broker, event)

    await ready(first)
    state = cluster.registry.part(Registry).state
    await eventually(lambda: state.kv is not None, what="state")

    async def correction():
        return [c for c in await state.corrections() if c.device_kind == "cuda"]

    for _ in range(200):
        if await correction():
            break
        await asyncio.sleep(0.05)
    [c1] = await correction()
    assert c1.samples == 1 and c1.last_error < -0.05  # predicted under the measurement
    fit_after = await cluster.deployments.fit(FitRequest(model_ref="small"))
    assert fit_after.estimates["cuda"].total > fit_before.estimates["cuda"].total
    assert abs(fit_after.estimates["cuda"].total - measured) / measured < 0.01
    assert (
        fit_after.estimates["cpu"].total == fit_before.estimates["cpu"].total
    )  # another device kind learns separately

    second = await deploy(cluster, model_ref="small", constraints={"gpu.product": "H100"})
    assert second.deployment.replicas[0].predicted_bytes > predicted
    await ready(second)
    for _ in range(200):
        [c2] = await correction()
        if c2.samples == 2:
            break
        await asyncio.sleep(0.05)
    assert c2.samples == 2 and abs(c2.last_error) < abs(c1.last_error) and abs(c2.last_error) < 0.01
    deployment = (await state.allocations()).deployments[second.deployment_id]
    assert deployment.state == "ready" and deployment.replicas[0].measured_peak == measured
    # each replica's booking against its measurement, at /metrics
    text = cluster.registry.metrics.exposition().decode()
    fit = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "strata_inventory_booked_to_measured_ratio"
        for s in f.samples
        if s.labels.get("device_kind") == "cuda" and "le" not in s.labels
    }
    booked = (predicted, second.deployment.replicas[0].predicted_bytes)
    assert fit["strata_inventory_booked_to_measured_ratio_count"] == 2
    assert fit["strata_inventory_booked_to_measured_ratio_sum"] == pytest.approx(sum(b / measured for b in booked))


async def test_undeploy_frees_the_allocation(cluster: Cluster):
    state = cluster.registry.part(Registry).state
    a = await deploy(cluster, model_ref="llama3-8b", constraints={"node": "gpu-24", "device": "cuda"})
    assert (
        await deploy(cluster, model_ref="llama3-8b", constraints={"node": "gpu-24", "device": "cuda"})
    ).code == "no_fit"
    assert (await state.allocations()).booked("gpu-24", "cuda:0") > 18 * GB
    released = await cluster.deployments.undeploy("llama3-8b", None)
    assert released == [a.deployment_id]
    assert (await state.allocations()).booked("gpu-24", "cuda:0") == 0
    assert (await deploy(cluster, model_ref="llama3-8b", constraints={"node": "gpu-24", "device": "cuda"})).scheduled
    await eventually(lambda: cluster.of("deploy.released", deployment_id=a.deployment_id), what="deploy.released")


async def test_optional_lru_eviction_makes_room_from_the_least_recently_used_ready_deployment(cluster: Cluster):
    lru = await cluster.start_registry(evict_lru=True)
    deployments = lru.part(Registry).deployments
    gpu24 = {"node": "gpu-24", "device": "cuda"}
    old = await deployments.deploy(DeployRequest(model_ref="small", constraints=gpu24))
    new = await deployments.deploy(DeployRequest(model_ref="small", constraints=gpu24))
    assert old.scheduled and new.scheduled
    weights = (await deployments.fit(FitRequest(model_ref="small"))).estimates["cuda"].raw.weights
    for outcome in (old, new):  # both loaded; `old` first, so it is the least recently used
        r = outcome.deployment.replicas[0]
        await deployments.ready(
            DeployReady(
                deployment_id=outcome.deployment_id,
                model=outcome.deployment.model,
                node_id=r.node_id,
                device=r.device,
                load_seconds=1,
                measured=MeasuredMemory(weights=weights, kv_cache=1, peak=r.predicted_bytes),
            )
        )
    big = await deployments.deploy(DeployRequest(model_ref="llama3-8b", constraints=gpu24))
    assert big.scheduled
    left = (await lru.part(Registry).state.allocations()).deployments
    assert set(left) == {big.deployment_id}  # 18.7 GB on a 22 GB card: both small ones had to go, oldest first
    await eventually(lambda: len(cluster.of("deploy.released")) == 2, what="evictions announced")
    assert [e.deployment_id for e in cluster.of("deploy.released")] == [old.deployment_id, new.deployment_id]
    assert (
        "evicted (least recently used) for llama3-8b"
        in cluster.of("deploy.released", deployment_id=old.deployment_id)[0].reason
    )
    without = await cluster.deployments.deploy(DeployRequest(model_ref="llama3-8b", constraints=gpu24))
    assert without.code == "no_fit"  # the default registry never evicts


async def test_a_deploys_embedding_pooling_travels_to_the_workers_scheduled_event(cluster: Cluster):
    """#18: `strata deploy --embedding-pooling mean` (a deploy.requested field) reaches the worker in
    deploy.scheduled, through the stored deployment (so a replica placed again keeps it)."""
    requested = DeployRequested(model_ref="tiny", embedding_pooling="mean")
    await bus.publish(cluster.registry.broker, make_event(requested, CLIENT))
    await eventually(
        lambda: cluster.of("deploy.scheduled", deployment_id=requested.deployment_id), what="deploy.scheduled"
    )
    assert cluster.of("deploy.scheduled", deployment_id=requested.deployment_id)[0].embedding_pooling == "mean"
    stored = (await cluster.registry.part(Registry).state.allocations()).deployments[requested.deployment_id]
    assert stored.embedding_pooling == "mean"
    plain = await deploy(cluster, model_ref="tiny")
    await eventually(lambda: cluster.of("deploy.scheduled", deployment_id=plain.deployment_id), what="deploy.scheduled")
    assert cluster.of("deploy.scheduled", deployment_id=plain.deployment_id)[0].embedding_pooling is None
    with pytest.raises(ValueError):
        DeployRequested(model_ref="tiny", embedding_pooling="max")
