"""A small cluster on one real nats-server: a scripted model-store, registry replicas, and agents with
scripted probes (a CPU node with 8 GB, a 24 GB GPU node, an 80 GB H100 node)."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from services.hardware_inventory.service_layer.registry import Registry
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.entrypoints.app import create_inventory
from shared import errors
from shared.catalog import ModelManifest, ModelMetadata, ResolvedModel, ResolveRequest
from shared.events import Event, ModelId, parse_event
from shared.service import Service
from tests.support.helpers import eventually, settings_for

GB = 10**9
BEAT_S = 0.2
# 2 s of silence before a node counts as lost: in-process agents share the GIL with the tests, and a
# loaded 2-core CI machine has been seen to starve them for more than 3 beats.
MISSED_BEATS = 10


def metadata(
    layers, hidden, inter, heads, kv, vocab, context, params, dtype="BF16", architecture="LlamaForCausalLM"
) -> ModelMetadata:
    return ModelMetadata(
        architecture=architecture,
        model_type="llama",
        parameters=params,
        dtype=dtype,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        vocab_size=vocab,
        context_length=context,
        weight_bytes=params * 2,
    )


MODELS = {
    "llama3-8b": metadata(32, 4096, 14336, 32, 8, 128256, 8192, 8_030_261_248),
    "tiny": metadata(4, 256, 768, 4, 2, 32000, 2048, 12_000_000),
    "small": metadata(24, 2048, 5632, 16, 4, 32000, 4096, 1_100_000_000),
    # tiny's figures, an architecture no runtime serves (shared/architectures.py)
    "unservable": metadata(4, 256, 768, 4, 2, 32000, 2048, 12_000_000, architecture="NopeForCausalLM"),
}


def probe(node_id: str, ram_gb: int, gpus: list[tuple[str, int]] = (), labels: dict | None = None) -> dict:
    return {
        "node_id": node_id,
        "hostname": f"host-{node_id}",
        "cpu_model": "Scripted CPU",
        "cpu_cores": 8,
        "ram_total": ram_gb * GB,
        "ram_free": ram_gb * GB,
        "disk_total": 500 * GB,
        "disk_free": 400 * GB,
        "labels": labels or {},
        "gpus": [
            {
                "id": f"cuda:{i}",
                "kind": "cuda",
                "name": name,
                "memory_total": mem * GB,
                "memory_free": mem * GB,
                "uuid": f"GPU-{node_id}-{i}",
                "compute_capability": "9.0" if "H100" in name else "8.9",
                "driver": "550.54",
            }
            for i, (name, mem) in enumerate(gpus)
        ],
    }


NODES = {
    "cpu-8": probe("cpu-8", 8, labels={"zone": "a"}),
    "gpu-24": probe("gpu-24", 64, [("NVIDIA GeForce RTX 4090", 24)], labels={"zone": "b"}),
    "gpu-80": probe("gpu-80", 256, [("NVIDIA H100 80GB HBM3", 80)], labels={"zone": "a"}),
}


def model_store(nats_url: str, tmp_path: Path) -> Service:
    service = Service("model-store", settings_for("model-store", nats_url, tmp_path / "model-store"))

    @service.rpc("resolve", ResolveRequest)
    async def resolve(request: ResolveRequest) -> ResolvedModel:
        name = request.ref.split(":")[0].split("@")[0]
        if name not in MODELS:
            raise errors.NotFound(f"no model named {name!r}")
        manifest = ModelManifest(name=name, version=1, files=[], metadata=MODELS[name])
        return ResolvedModel(
            model=ModelId(name=name, version=1, digest=f"sha256:{name:0>64}"[:71]), manifest=manifest, signature={}
        )

    return service


@dataclass
class Cluster:
    nats_url: str
    tmp: Path
    stack: AsyncExitStack
    registries: list[Service] = field(default_factory=list)
    agents: dict[str, tuple[Service, AsyncExitStack]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    store: Service | None = None

    @property
    def registry(self) -> Service:
        return self.registries[0]

    @property
    def deployments(self):
        return self.registry.part(Registry).deployments

    async def start_agent(self, node_id: str) -> Service:
        path = self.tmp / f"{node_id}.json"
        path.write_text(json.dumps(NODES[node_id]))
        config = InventoryConfig(roles={"agent"}, heartbeat_interval_s=BEAT_S, probe_file=path)
        agent = create_inventory(settings_for("hardware-inventory", self.nats_url, self.tmp / node_id, node_id), config)
        stack = AsyncExitStack()
        await stack.enter_async_context(agent.running())
        self.agents[node_id] = (agent, stack)
        return agent

    async def stop_agent(self, node_id: str) -> None:
        _, stack = self.agents.pop(node_id)
        await stack.aclose()

    async def start_registry(self, **overrides) -> Service:
        config = InventoryConfig(
            roles={"registry"}, heartbeat_interval_s=BEAT_S, missed_beats=MISSED_BEATS, **overrides
        )
        name = f"registry-{len(self.registries)}"
        registry = create_inventory(settings_for("hardware-inventory", self.nats_url, self.tmp / name, name), config)
        await self.stack.enter_async_context(registry.running())
        self.registries.append(registry)
        return registry

    def of(self, event_type: str, **match) -> list:
        return [
            e.data
            for e in self.events
            if e.type == event_type and all(getattr(e.data, k) == v for k, v in match.items())
        ]

    async def wait_nodes(self, n: int = 3) -> None:
        async def alive():
            nodes = await self.registry.part(Registry).state.nodes()
            return [
                x for x in nodes if x.status == "alive" and x.node_id in self.registry.part(Registry).nodes.telemetry
            ]

        result = []

        async def poll():
            while len(result) < n:
                result[:] = await alive()
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), 15)


@pytest.fixture
async def cluster(nats_server, tmp_path):
    async with AsyncExitStack() as stack:
        c = Cluster(nats_server.url, tmp_path, stack)
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)

        async def record(msg):
            try:
                c.events.append(parse_event(msg.data, msg.subject))
            except Exception:
                pass

        await nc.subscribe("evt.>", cb=record)
        c.nc = nc
        c.store = model_store(nats_server.url, tmp_path)
        await stack.enter_async_context(c.store.running())
        await c.start_registry()
        for node_id in NODES:
            await c.start_agent(node_id)
        await c.wait_nodes()
        yield c
        for node_id in list(c.agents):
            await c.stop_agent(node_id)


__all__ = ["Cluster", "eventually", "GB", "MISSED_BEATS"]
