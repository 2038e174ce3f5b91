"""#20 item 6: the context a deployment gets does not shrink with each redeploy. The worker sizes its
KV cache to the booked kv_cache_bytes, and its context is what that cache holds; so the correction
learned from measurements must not feed back into it, must ignore measurements too small or too far
off to mean anything (the built-in model's: +1091 %), and `strata fit` says which applied and why."""

from __future__ import annotations

import asyncio

from cli import main as cli_main
from services.hardware_inventory.service_layer.registry import Registry
from shared.events import DeployReady, MeasuredMemory
from shared.inventory import DeployRequest, FitRequest
from tests.hardware_inventory.conftest import Cluster

MiB = 2**20
H100 = {"gpu.product": "H100"}


async def deploy_and_measure(c: Cluster, model_ref: str, constraints: dict, overhead_seen: float | None = None,
                             peak: int | None = None, weights: int | None = None):
    """Deploy, then report ready as the worker would: its weights, the KV cache it was told to
    allocate, and a peak with ``overhead_seen`` x the predicted activations and workspace (or ``peak``
    and ``weights``)."""
    outcome = await c.deployments.deploy(DeployRequest(model_ref=model_ref, constraints=constraints))
    assert outcome.scheduled, outcome.reason
    replica = outcome.deployment.replicas[0]
    raw = (await c.deployments.fit(FitRequest(model_ref=model_ref))).estimates[replica.device_kind].raw
    weights = raw.weights if weights is None else weights
    if peak is None:
        peak = weights + replica.kv_cache_bytes + int((overhead_seen or 1.0) * (raw.activations + raw.workspace))
    await c.deployments.ready(DeployReady(
        deployment_id=outcome.deployment_id, model=outcome.deployment.model, node_id=replica.node_id or "",
        device=replica.device or "", load_seconds=1.0,
        measured=MeasuredMemory(weights=weights, kv_cache=replica.kv_cache_bytes, peak=peak)))
    return outcome.deployment, replica


async def test_redeploys_and_a_registry_restart_keep_the_same_context(cluster: Cluster):
    seen = []
    for _ in range(4):
        deployment, replica = await deploy_and_measure(cluster, "small", H100, overhead_seen=0.8)
        tokens = (
            replica.kv_cache_bytes
            // (await cluster.deployments.fit(FitRequest(model_ref="small"))).estimates["cuda"].raw.kv_bytes_per_token
        )
        seen.append((deployment.context_length, replica.kv_cache_bytes, tokens))
        await cluster.deployments.undeploy(None, deployment.deployment_id)
    [correction] = [c for c in await cluster.registry.part(Registry).state.corrections() if c.device_kind == "cuda"]
    assert correction.samples == 4 and correction.overhead_factor < 1  # it did learn, from the terms it predicts
    assert len(set(seen)) == 1, seen  # 256 -> 224 -> 176 -> 144 was the bug
    context, _, tokens = seen[0]
    assert tokens == context + 16  # the KV cache holds the whole context, and the engine's null block

    restarted = await cluster.start_registry()  # a fresh process: what it knows comes from KV
    outcome = await restarted.part(Registry).deployments.deploy(DeployRequest(model_ref="small", constraints=H100))
    replica = outcome.deployment.replicas[0]
    assert (outcome.deployment.context_length, replica.kv_cache_bytes) == seen[0][:2]


async def test_a_measurement_too_small_or_too_far_off_is_ignored_and_not_stored(cluster: Cluster, capsys):
    state = cluster.registry.part(Registry).state
    # the built-in model on a CPU: the process grew by 17.5 MiB, the formula said 208 MiB (+1091 %)
    await deploy_and_measure(cluster, "tiny", {"device": "cpu"}, peak=int(17.5 * MiB), weights=8 * MiB)
    # a big model whose report counted another process's memory in
    small = (await cluster.deployments.fit(FitRequest(model_ref="small"))).estimates["cuda"].raw
    await deploy_and_measure(cluster, "small", H100, peak=4 * small.total)
    corrections = await state.corrections()
    assert sorted((c.device_kind, c.samples, c.ignored) for c in corrections) == [("cpu", 0, 1), ("cuda", 0, 1)]
    assert all(
        (c.weights_factor, c.overhead_factor) == (1.0, 1.0) for c in corrections
    )  # nothing learned, no figures kept

    fit = await cluster.deployments.fit(FitRequest(model_ref="tiny"))
    assert fit.estimates["cpu"].corrected == fit.estimates["cpu"].raw
    assert "too small to learn from" in fit.estimates["cpu"].correction_note

    await deploy_and_measure(cluster, "small", H100, overhead_seen=1.5)
    fit = await cluster.deployments.fit(FitRequest(model_ref="small"))
    assert fit.estimates["cuda"].correction_note.startswith("corrected by x1.")
    assert "from 1 measurement" in fit.estimates["cuda"].correction_note

    url = ["--nats-url", cluster.nats_url]
    assert await asyncio.to_thread(cli_main.main, ["fit", "small", "--context", "4096", *url]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "corrected by x1." in out and "from 1 measurement" in out
