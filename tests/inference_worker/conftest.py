"""Fixtures: tiny random-weight Llama checkpoints (the engine tests' builders), an inference-worker
in-process against the real nats-server with a local artifact source, and a NATS client that sees
every event and can schedule deployments as hardware-inventory would."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from shared import bus
from shared.events import DeployScheduled, Event, EventData, ModelId, Source, make_event, parse_event
from shared.inference import InferenceRequest
from shared.rpc import RpcReply
from shared import subjects
from tests.engine.conftest import _one_torch_thread, build_checkpoint, tokenizer_dir  # noqa: F401  (fixtures)
from tests.support.helpers import eventually, settings_for

from services.inference_worker.adapters.artifacts import LocalSource
from services.inference_worker.entrypoints.app import WorkerOptions, create_service
from services.inference_worker.service_layer.deployments import EngineOptions
from services.inference_worker.service_layer.jobs import JobOptions

INVENTORY = Source(service="hardware-inventory", node="node-inv")
KV_BYTES = 2 << 20  # plenty for a few short sequences of the tiny model


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("worker-ckpts")
    tiny = build_checkpoint(root / "tiny", tokenizer_dir, arch="llama", seed=1).path
    other = build_checkpoint(root / "other", tokenizer_dir, arch="llama", seed=2, num_hidden_layers=1).path
    unknown = root / "unknown"
    shutil.copytree(tiny, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (unknown / "config.json").write_text(json.dumps(config))
    corrupt = root / "corrupt"
    shutil.copytree(tiny, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"tiny": tiny, "other": other, "unknown": unknown, "corrupt": corrupt}


def model_id(name: str, version: int = 1) -> ModelId:
    return ModelId(name=name, version=version, digest=f"sha256:{name}{version:02d}".ljust(71, "0"))


@dataclass
class Bus:
    """A client of the test's NATS: sees every event, publishes as hardware-inventory would."""

    nc: nats.aio.client.Client
    node_id: str
    events: list[Event[EventData]] = field(default_factory=list)

    def of(self, data_cls: type, **match) -> list:
        return [e.data for e in self.events if isinstance(e.data, data_cls)
                and all(getattr(e.data, k) == v for k, v in match.items())]

    async def wait(self, data_cls: type, timeout: float = 30.0, **match):
        await eventually(lambda: self.of(data_cls, **match), timeout, f"{data_cls.__name__} {match}")
        return self.of(data_cls, **match)[-1]

    async def emit(self, data: EventData, source: Source = INVENTORY, event_id: str | None = None) -> Event:
        event = make_event(data, source, event_id=event_id)
        await bus.publish_js(self.nc.jetstream(), event)
        return event

    async def schedule(self, name: str, deployment_id: str | None = None, *, node_id: str | None = None,
                       version: int = 1, context_length: int = 256, kv_cache_bytes: int = KV_BYTES,
                       **extra) -> DeployScheduled:
        data = DeployScheduled(deployment_id=deployment_id or f"dep-{name}", model=model_id(name, version),
                               node_id=node_id or self.node_id, device="cpu", predicted_bytes=1,
                               context_length=context_length, model_ref=f"{name}:{version}",
                               kv_cache_bytes=kv_cache_bytes, dtype="float32", **extra)
        await self.emit(data)
        return data

    async def request(self, name: str, timeout: float = 30.0, **body) -> RpcReply:
        req = InferenceRequest(model=name, **body)
        msg = await self.nc.request(subjects.inference_request(name.split(":")[0].split("@")[0]),
                                    req.model_dump_json().encode(), timeout=timeout)
        return RpcReply.model_validate_json(msg.data)


async def connect_bus(url: str, node_id: str) -> Bus:
    nc = await nats.connect(url)
    await bus.ensure_streams(nc.jetstream())
    b = Bus(nc, node_id)

    async def collect(msg) -> None:
        b.events.append(parse_event(msg.data, msg.subject))

    await nc.subscribe("evt.>", cb=collect)
    return b


def worker_options(**overrides) -> WorkerOptions:
    options = WorkerOptions(engine=EngineOptions(max_num_seqs=16), jobs=JobOptions(ack_wait_s=5.0))
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def make_worker(
    nats_url: str, data_dir: Path, ckpts: dict[str, Path] | None, node_id: str = "node-a", **options
):
    """``ckpts`` None: the real adapter, model-store's verified fetch."""
    settings = settings_for("inference-worker", nats_url, data_dir, node_id)
    artifacts = LocalSource(ckpts) if ckpts is not None else None
    return create_service(settings, artifacts=artifacts, options=worker_options(**options))


@pytest.fixture
async def bus_client(nats_server):
    b = await connect_bus(nats_server.url, "node-a")
    yield b
    await b.nc.close()


@pytest.fixture
async def worker(nats_server, tmp_path, ckpts, bus_client):
    """A running worker on node-a; tests schedule what they need."""
    service = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    async with service.running():
        yield service
        # tests end with requests done: the shutdown drains nothing


async def deployed(bus_client: Bus, name: str, **kw) -> DeployScheduled:
    scheduled = await bus_client.schedule(name, **kw)
    from shared.events import DeployReady
    await bus_client.wait(DeployReady, deployment_id=scheduled.deployment_id)
    return scheduled


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    return eventually(predicate, timeout, what)


__all__ = ["Bus", "asyncio", "deployed", "make_worker", "model_id", "wait_for"]
