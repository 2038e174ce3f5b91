"""The HTTP API through a real uvicorn, the CLI, and malformed events, against the scripted cluster."""

from __future__ import annotations

import asyncio
import json

import httpx

from cli import main as cli_main
from services.hardware_inventory.service_layer.registry import Registry
from shared import subjects
from shared.events import DeadLetter
from tests.hardware_inventory.conftest import Cluster
from tests.support.live import serve_on_loop


class Http:
    """A real uvicorn on a free port, on the test's event loop (the service's NATS connection lives there)."""

    def __init__(self, app) -> None:
        self.serving = serve_on_loop(app)

    async def __aenter__(self) -> httpx.AsyncClient:
        self.url = await self.serving.__aenter__()
        self.client = httpx.AsyncClient(base_url=self.url, timeout=10)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self.serving.__aexit__(*exc)


async def test_cli_deploy_waits_for_each_replica_to_load_and_says_why_one_failed(cluster: Cluster, capsys):
    """#20 item 1: a deploy the worker could not load used to exit 0 with the normal table. Here a scripted
    worker answers each deploy.scheduled: 'small' loads, 'tiny' fails with the worker's reason."""
    from shared import bus
    from shared.events import DeployFailed, DeployReady, MeasuredMemory, Source, make_event, parse_event

    worker = Source(service="inference-worker", node="scripted")
    answered: list[str] = []

    async def scripted_worker(msg) -> None:
        placed = parse_event(msg.data, msg.subject).data
        if placed.model_ref == "small":
            outcome = DeployReady(
                deployment_id=placed.deployment_id,
                model=placed.model,
                node_id=placed.node_id,
                device=placed.device,
                measured=MeasuredMemory(weights=2 * 10**9, kv_cache=10**8, peak=3 * 10**9),
                load_seconds=1.5,
            )
        elif placed.model_ref == "tiny":
            outcome = DeployFailed(
                deployment_id=placed.deployment_id,
                model=placed.model,
                node_id=placed.node_id,
                reason="unsupported architecture 'NopeForCausalLM'",
            )
        else:
            return
        answered.append(placed.model_ref)
        await bus.publish_js(cluster.nc.jetstream(), make_event(outcome, worker))

    await cluster.nc.subscribe("evt.deploy.scheduled", cb=scripted_worker)
    url = ["--nats-url", cluster.nats_url]
    assert await cli("deploy", "small", "--replicas", "2", "-c", "device=cuda", *url) == 0
    captured = capsys.readouterr()
    assert captured.out.count("ready") == 2 and "3.00 GB" in captured.out and "1.5s" in captured.out
    assert "waiting for the workers to load it" in captured.err
    assert await cli("deploy", "tiny", *url) == 1
    err = capsys.readouterr().err
    assert "failed to load: unsupported architecture 'NopeForCausalLM'" in err, err
    assert await cli("deploy", "llama3-8b", "-c", "node=gpu-80", "--load-timeout", "0.5", *url) == 1  # nobody loads it
    assert "waited 0.5s for the workers to load it (0 of 1 ready)" in capsys.readouterr().err
    assert answered == ["small", "small", "tiny"]


async def test_http_api_answers_with_numbers_and_typed_errors(cluster: Cluster):
    async with Http(cluster.registry.http) as http:
        nodes = (await http.get("/nodes")).json()["nodes"]
        assert {n["node"]["node_id"] for n in nodes} == {"cpu-8", "gpu-24", "gpu-80"}
        h100 = next(n for n in nodes if n["node"]["node_id"] == "gpu-80")
        assert h100["node"]["devices"][1]["name"] == "NVIDIA H100 80GB HBM3" and h100["available"]["cuda:0"] == int(
            80e9 * 0.92
        )
        assert (await http.get("/nodes/nope")).status_code == 404
        fit = (await http.get("/fit", params={"model_ref": "llama3-8b", "context_length": 8192})).json()
        assert fit["estimates"]["cuda"]["raw"]["weights"] == 16_060_522_496
        assert fit["estimates"]["cuda"]["raw"]["kv_bytes_per_token"] == 131_072
        verdicts = {(r["node_id"], r["device"]): r["fits"] for r in fit["rows"]}
        assert verdicts[("gpu-24", "cuda:0")] and verdicts[("gpu-80", "cuda:0")] and not verdicts[("cpu-8", "cpu")]
        q8 = (
            await http.get("/fit", params={"model_ref": "llama3-8b", "context_length": 8192, "quantize": "int8"})
        ).json()
        assert q8["estimates"]["cuda"]["raw"]["quantize"] == "int8"
        assert q8["estimates"]["cuda"]["raw"]["weights"] < 0.6 * 16_060_522_496  # the linears at a byte a weight

        created = await http.post(
            "/deployments", json={"model_ref": "small", "replicas": 2, "constraints": {"device": "cuda"}}
        )
        assert created.status_code == 201 and len(created.json()["deployment"]["replicas"]) == 2
        bad = await http.post("/deployments", json={"model_ref": "small", "constraints": {"gpu.prodcut": "H100"}})
        assert bad.status_code == 400 and "unknown constraint key" in bad.json()["error"]["message"]
        zero = await http.post("/deployments", json={"model_ref": "small", "replicas": 0})
        assert zero.status_code == 422 and "replicas" in zero.text
        missing = await http.post("/deployments", json={"model_ref": "nope"})
        assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]
        full = await http.post("/deployments", json={"model_ref": "llama3-8b", "constraints": {"node": "cpu-8"}})
        assert full.status_code == 409 and "cpu-8/cpu" in full.json()["error"]["message"]
        bad_fit = await http.get("/fit", params={"model_ref": "small", "constraint": "gpu.product"})
        assert bad_fit.status_code == 400 and "KEY=VALUE" in bad_fit.json()["error"]["message"]

        listed = (await http.get("/deployments")).json()["deployments"]
        assert [d["model_ref"] for d in listed] == ["small"]
        gone = await http.delete("/deployments", params={"model_ref": "small"})
        assert gone.status_code == 200 and gone.json()["released"] == [created.json()["deployment_id"]]
        assert (await http.delete("/deployments", params={"model_ref": "small"})).status_code == 404
        assert (await http.get("/corrections")).json() == {"corrections": []}
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert {"/nodes", "/fit", "/deployments", "/corrections"} <= set(paths)


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main.main, list(argv))


async def test_cli_commands(cluster: Cluster, capsys):
    url = ["--nats-url", cluster.nats_url]
    assert await cli("nodes", *url) == 0
    out = capsys.readouterr().out
    assert "cpu-8" in out and "NVIDIA H100 80GB HBM3" in out and "alive" in out
    assert await cli("fit", "llama3-8b", "--context", "8192", *url) == 0
    out = capsys.readouterr().out
    assert "16.06 GB" in out and "short by" in out and "fits" in out
    assert await cli("fit", "llama3-8b", "--context", "8192", "--quantize", "int4", *url) == 0
    assert "+ int4" in capsys.readouterr().out
    assert await cli("deploy", "small", "--replicas", "2", "-c", "device=cuda", "--no-wait", *url) == 0
    out = capsys.readouterr().out
    assert "gpu-24" in out and "gpu-80" in out and "placed" in out
    assert await cli("deploy", "llama3-8b", "-c", "node=cpu-8", *url) == 1
    assert "rejected: no device fits" in capsys.readouterr().err
    assert await cli("deployments", *url) == 0
    assert "small" in capsys.readouterr().out
    assert await cli("deployments", "--json", *url) == 0
    assert len(json.loads(capsys.readouterr().out)["deployments"]) == 1
    assert await cli("undeploy", "small", *url) == 0
    assert "undeployed 1" in capsys.readouterr().out
    assert await cli("undeploy", "small", *url) == 1
    assert "not_found: no deployment of 'small'" in capsys.readouterr().err
    assert await cli("nodes", "--nats-url", "nats://127.0.0.1:1") == 1
    assert "cannot reach NATS" in capsys.readouterr().err


async def test_a_malformed_deploy_request_is_dead_lettered_with_the_reason(cluster: Cluster):
    js = cluster.nc.jetstream()
    raw = {
        "id": "bad-1",
        "type": "deploy.requested",
        "source": {"service": "cli", "node": "x"},
        "version": 1,
        "time": "2025-01-01T00:00:00Z",
        "data": {"model_ref": "small", "replicas": 0},
    }
    await js.publish("evt.deploy.requested", json.dumps(raw).encode(), headers={"Nats-Msg-Id": "bad-1"})

    async def letters():
        try:
            info = await js.stream_info(subjects.DEADLETTER_STREAM)
        except Exception:
            return []
        return (
            [
                DeadLetter.model_validate_json((await js.get_msg(subjects.DEADLETTER_STREAM, s)).data)
                for s in range(info.state.first_seq, info.state.last_seq + 1)
            ]
            if info.state.messages
            else []
        )

    for _ in range(100):
        found = await letters()
        if found:
            break
        await asyncio.sleep(0.05)
    assert found and found[0].service == "hardware-inventory" and "replicas" in found[0].reason
    assert not (await cluster.registry.part(Registry).state.allocations()).deployments
