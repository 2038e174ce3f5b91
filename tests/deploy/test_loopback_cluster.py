"""Two machines' worth of Strata on one host: a 3-node NATS cluster (EVENTS at 3 replicas), two node
sets started as `strata up --role node --nats-url ...` (an inventory agent and an inference-worker
each, own data dir and node id), and one central set (model-store, the inventory registry, the
api-gateway). A model deployed with two replicas lands on both nodes, and both answer requests.

Each part connects to a different cluster member, so every hop crosses a route between servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import pytest

from cli import natsd
from cli.cluster import LocalCluster
from shared import bus, rpc, subjects
from shared.catalog import PushModelRequest
from shared.events import DeployReady, DeployRequested, Event, InferenceCompleted, Source, make_event, parse_event
from shared.inventory import Empty, NodeList
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, build_checkpoint, tokenizer_dir  # noqa: F401  (fixtures)
from tests.model_store.conftest import upload_dir
from tests.support.helpers import eventually, make_service

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
NODE_BOOT_S = 120  # two supervisors, four Python processes (two import torch) on a busy 2-core box
TEST_BUDGET_S = 220  # under pytest-timeout's 240: what was stuck is reported with the nodes' logs
CLIENT = Source(service="cli", node="loopback-test")


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path / "nats", size=3) as running:
        yield running


@pytest.fixture
def replicated(monkeypatch):
    """Every in-process service (and every subprocess, which inherits the environment) asks for R3."""
    monkeypatch.setenv("STRATA_STREAM_REPLICAS", "3")
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")
    monkeypatch.delenv("STRATA_INVENTORY_ROLES", raising=False)


class NodeSet:
    """`strata up --role node` in its own process group, logging to its data dir."""

    def __init__(self, nats_url: str, data_dir: Path) -> None:
        data_dir.mkdir(parents=True)
        self.data_dir = data_dir
        self.log = data_dir / "up.log"
        env = {**os.environ, "STRATA_INVENTORY_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "cli.main", "up", "--role", "node", "--nats-url", nats_url,
                "--data-dir", str(data_dir), "--wait-timeout", str(NODE_BOOT_S),
                "--port", f"hardware-inventory={natsd.free_port()}", "--port", f"inference-worker={natsd.free_port()}"]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def node_id(self) -> str | None:
        path = self.data_dir / "node-id"
        return path.read_text().strip() if path.exists() else None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the supervisor stops its children first
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


class Events:
    """Every event on evt.> as seen from one cluster member."""

    def __init__(self) -> None:
        self.seen: list[Event] = []

    async def listen(self, nc: nats.aio.client.Client) -> None:
        async def collect(msg) -> None:
            self.seen.append(parse_event(msg.data, msg.subject))

        await nc.subscribe("evt.>", cb=collect)

    def of(self, data_cls: type, **match) -> list:
        return [e.data for e in self.seen if isinstance(e.data, data_cls)
                and all(getattr(e.data, k) == v for k, v in match.items())]


async def test_two_node_sets_on_a_3_node_cluster_both_serve_a_2_replica_deployment(
        cluster, replicated, tmp_path, tokenizer_dir):  # noqa: F811
    nodes = [NodeSet(cluster.urls[2], tmp_path / "node-a"), NodeSet(cluster.urls[0], tmp_path / "node-b")]
    observer = await nats.connect(cluster.urls[1])
    events = Events()
    await events.listen(observer)
    try:
        async with asyncio.timeout(TEST_BUDGET_S):  # a hang names its await, not pytest-timeout's bare select()
            # the streams exist at R3 once any service started; the cluster spreads the three copies
            store = make_service("model-store", cluster.urls[0], tmp_path / "central")
            registry_env = {"STRATA_INVENTORY_ROLES": "registry", "STRATA_INVENTORY_HEARTBEAT_S": "1"}
            with pytest.MonkeyPatch.context() as env:
                for key, value in registry_env.items():
                    env.setenv(key, value)
                registry = make_service("hardware-inventory", cluster.urls[1], tmp_path / "central")
            async with store.running(), registry.running():
                info = await observer.jetstream().stream_info(subjects.EVENTS_STREAM)
                assert info.config.num_replicas == 3
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # a leader and two followers

                ckpt = build_checkpoint(tmp_path / "ckpt" / "tiny", tokenizer_dir, seed=1, num_hidden_layers=1).path
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=store.http), base_url="http://store"
                ) as client:
                    files = await upload_dir(client, ckpt)
                    pushed = await client.post(
                        "/v1/models", json=PushModelRequest(name="tiny", files=files).model_dump(mode="json")
                    )
                    assert pushed.status_code == 201, pushed.text

                async def alive_nodes() -> set[str]:
                    listing = await rpc.call(
                        observer, subjects.rpc("hardware-inventory", "nodes"), Empty(), NodeList, timeout=5
                    )
                    return {
                        v.node.node_id
                        for v in listing.nodes
                        if v.node.status == "alive" and v.seconds_since_heartbeat is not None
                    }

                deadline = asyncio.get_running_loop().time() + NODE_BOOT_S
                while not {n.node_id for n in nodes} <= await alive_nodes() or None in {n.node_id for n in nodes}:
                    for node in nodes:
                        assert node.process.poll() is None, f"strata up --role node exited:\n{node.output()}"
                    assert asyncio.get_running_loop().time() < deadline, "the agents did not register:\n" + "\n".join(
                        n.output() for n in nodes
                    )
                    await asyncio.sleep(0.5)
                node_ids = {n.node_id for n in nodes}
                assert len(node_ids) == 2, "each node set has its own identity"

                request = DeployRequested(
                    model_ref="tiny", replicas=2, context_length=128, dtype="float32", constraints={"device": "cpu"}
                )
                event = make_event(request, CLIENT)
                await bus.publish_js(observer.jetstream(), event)
                await eventually(
                    lambda: len({r.node_id for r in events.of(DeployReady, deployment_id=request.deployment_id)}) == 2,
                    NODE_BOOT_S,
                    "deploy.ready from both nodes",
                )
                assert {r.node_id for r in events.of(DeployReady, deployment_id=request.deployment_id)} == node_ids

                with serve_gateway(cluster.urls[2], tmp_path / "gateway", TEST_CONFIG) as gateway:
                    client = gateway.client()
                    served_by: set[str] = set()
                    for i in range(40):  # the queue group picks a replica at random: both answer within a few
                        answer = await client.chat.completions.create(
                            model="tiny",
                            messages=[{"role": "user", "content": f"hello {i}"}],
                            max_tokens=2,
                            temperature=0,
                        )
                        assert answer.choices[0].message.role == "assistant"
                        await eventually(
                            lambda i=i: len(events.of(InferenceCompleted)) > i, 30, f"inference.completed #{i}"
                        )
                        served_by = {c.node_id for c in events.of(InferenceCompleted)}
                        if served_by == node_ids:
                            break
                    assert served_by == node_ids, f"only {served_by} answered"
    except TimeoutError as exc:
        raise AssertionError(
            f"stuck past {TEST_BUDGET_S}s (the await is in the traceback above); events seen: "
            f"{sorted({e.type for e in events.seen})}; the node sets' logs:\n" + "\n".join(n.output() for n in nodes)
        ) from exc
    finally:
        for node in nodes:
            node.stop()
        await observer.close()
    for node in nodes:
        assert "Traceback" not in node.output(), node.output()
