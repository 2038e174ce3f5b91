"""An architecture no runtime serves (shared/architectures.py) is refused by fit and deploy at once,
naming the supported ones, before anything is booked or sent to a worker."""

from __future__ import annotations

from services.hardware_inventory.service_layer.registry import Registry
from shared.architectures import unsupported_reason
from shared.inventory import DeployRequest, FitRequest
from tests.hardware_inventory.conftest import Cluster
from tests.hardware_inventory.test_interfaces import Http, cli
from tests.support.helpers import eventually

REASON = unsupported_reason(["NopeForCausalLM"])


async def test_fit_refuses_an_architecture_no_runtime_serves_naming_the_supported_ones(cluster: Cluster, capsys):
    report = await cluster.deployments.fit(FitRequest(model_ref="unservable"))
    assert report.refused == REASON and "LlamaForCausalLM" in report.refused
    assert report.rows == [] and report.estimates == {}
    assert (await cluster.deployments.fit(FitRequest(model_ref="tiny"))).refused is None  # the same figures, served
    async with Http(cluster.registry.http) as http:
        answer = await http.get("/fit", params={"model_ref": "unservable"})
    assert answer.status_code == 200 and answer.json()["refused"] == REASON
    assert await cli("fit", "unservable", "--nats-url", cluster.nats_url) == 1
    captured = capsys.readouterr()
    assert f"refused: {REASON}" in captured.err and "fits" not in captured.out


async def test_deploy_refuses_it_before_anything_is_booked_or_sent_to_a_worker(cluster: Cluster, capsys):
    worker_heard = []  # what a worker subscribed to placements would receive

    async def worker(msg) -> None:
        worker_heard.append(msg.subject)

    await cluster.nc.subscribe("evt.deploy.scheduled", cb=worker)
    assert await cli("deploy", "unservable", "--no-wait", "--nats-url", cluster.nats_url) == 1
    assert f"rejected: {REASON}" in capsys.readouterr().err
    await eventually(lambda: cluster.of("deploy.rejected", model_ref="unservable"), what="deploy.rejected recorded")
    [rejected] = cluster.of("deploy.rejected", model_ref="unservable")
    assert rejected.reason == REASON
    # events leave the registry in order: a placement would have come before its rejection
    assert worker_heard == [] and not cluster.of("deploy.scheduled")
    assert rejected.deployment_id not in (await cluster.registry.part(Registry).state.allocations()).deployments

    outcome = await cluster.deployments.deploy(DeployRequest(model_ref="unservable"))
    assert (outcome.scheduled, outcome.code, outcome.reason) == (False, "unsupported", REASON)
    async with Http(cluster.registry.http) as http:
        answer = await http.post("/deployments", json={"model_ref": "unservable"})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == REASON
    assert (await cluster.registry.part(Registry).state.allocations()).deployments == {}
    assert worker_heard == []
