"""A scripted run of a small fleet, published as the real services would publish it, through NATS."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import nats
from nats.aio.client import Client

from shared import bus, subjects
from shared.events import (
    DeadLetter, DeployFailed, DeployLoading, DeployReady, DeployRequested, DeployScheduled, DeviceInfo, EventData,
    InferenceCompleted, InferenceFailed, LedgerCheckpoint, MeasuredMemory, ModelId, NodeHeartbeat, NodeRegistered,
    Source, make_event,
)
from tests.support.helpers import flushed

GiB = 1 << 30
TINY = ModelId(name="tiny", version=2, digest="sha256:" + "ab" * 32)
BROKEN = ModelId(name="broken", version=1, digest="sha256:" + "cd" * 32)
CPU = DeviceInfo(id="cpu", kind="cpu", name="Xeon", memory_total=64 * GiB, memory_free=40 * GiB)
GPU = DeviceInfo(id="cuda:0", kind="cuda", name="NVIDIA H100", memory_total=80 * GiB, memory_free=30 * GiB,
                 compute_capability="9.0")


@dataclass
class Publisher:
    """Publishes any service's events (tests play every service) the way shared.bus does."""

    nc: Client

    @classmethod
    async def connect(cls, url: str) -> Publisher:
        nc = await nats.connect(url)
        await bus.ensure_streams(nc.jetstream())
        return cls(nc)

    async def send(self, data: EventData, *, at: datetime | None = None, service: str | None = None) -> None:
        event = make_event(data, Source(service=service or data.PUBLISHER, node="node-t"))
        if at is not None:
            event = event.model_copy(update={"time": at})
        if data.PERSISTENT:
            await bus.publish_js(self.nc.jetstream(), event)
        else:
            await self.nc.publish(event.subject, event.to_bytes())
            await flushed(self.nc)

    async def dead_letter(self, service: str, reason: str = "handler failed 5 times: boom") -> None:
        letter = DeadLetter(
            service=service, consumer=service, subject="evt.x.y", reason=reason, deliveries=5, payload="{}"
        )
        await self.nc.jetstream().publish(subjects.dead_letter(service), letter.model_dump_json().encode())

    async def close(self) -> None:
        await self.nc.close()


def completed(
    i: int, *, e2e: float = 0.4, model: ModelId = TINY, tokens: int = 20, at_node: str = "gpu-1"
) -> InferenceCompleted:
    return InferenceCompleted(
        request_id=f"r{i}",
        trace_id=None,
        model=model,
        deployment_id="dep-tiny",
        node_id=at_node,
        device="cuda:0",
        prompt_tokens=12,
        completion_tokens=tokens,
        queue_seconds=0.01,
        time_to_first_token_seconds=0.05,
        time_per_output_token_seconds=0.015,
        e2e_seconds=e2e,
        finish_reason="stop" if i % 5 else "length",
        prompt_commitment="0" * 64,
        output_sha256="1" * 64,
    )


def failed(i: int, model: str = "tiny@prod") -> InferenceFailed:
    return InferenceFailed(request_id=f"f{i}", model_ref=model, node_id="gpu-1", reason="engine error", e2e_seconds=0.2)


async def fleet(p: Publisher) -> None:
    """Two nodes (a CPU box and a GPU box), beating."""
    await p.send(
        NodeRegistered(
            node_id="cpu-1", hostname="box-a", cpu_model="Xeon", cpu_cores=16, ram_total=64 * GiB, devices=[CPU]
        )
    )
    await p.send(
        NodeRegistered(
            node_id="gpu-1", hostname="box-b", cpu_model="EPYC", cpu_cores=32, ram_total=128 * GiB, devices=[CPU, GPU]
        )
    )
    await beat(p)


async def beat(p: Publisher) -> None:
    await p.send(NodeHeartbeat(node_id="cpu-1", ram_free=40 * GiB, devices=[CPU], utilisation={"cpu": 0.25}))
    await p.send(
        NodeHeartbeat(
            node_id="gpu-1",
            ram_free=90 * GiB,
            devices=[CPU, GPU],
            utilisation={"cpu": 0.1, "cuda:0": 0.72},
            loaded_models=["dep-tiny"],
        )
    )  # what agents send: deployment ids


async def deployments(p: Publisher) -> None:
    """tiny is placed and ready on the GPU; broken fails to load."""
    await p.send(DeployRequested(deployment_id="dep-tiny", model_ref="tiny@prod"))
    await p.send(
        DeployScheduled(
            deployment_id="dep-tiny",
            model=TINY,
            node_id="gpu-1",
            device="cuda:0",
            predicted_bytes=GiB,
            context_length=2048,
        )
    )
    await p.send(DeployLoading(deployment_id="dep-tiny", model=TINY, node_id="gpu-1", device="cuda:0"))
    await p.send(
        DeployReady(
            deployment_id="dep-tiny",
            model=TINY,
            node_id="gpu-1",
            device="cuda:0",
            measured=MeasuredMemory(weights=GiB, kv_cache=GiB // 2, peak=2 * GiB),
            load_seconds=1.5,
        )
    )
    await p.send(DeployRequested(deployment_id="dep-broken", model_ref="broken"))
    await p.send(
        DeployScheduled(
            deployment_id="dep-broken",
            model=BROKEN,
            node_id="cpu-1",
            device="cpu",
            predicted_bytes=GiB,
            context_length=512,
        )
    )
    await p.send(
        DeployFailed(deployment_id="dep-broken", model=BROKEN, node_id="cpu-1", reason="signature does not verify")
    )


async def traffic(p: Publisher, n: int = 30, *, spread_s: float = 60.0) -> None:
    """n completed requests spread over the last spread_s seconds, one failure."""
    now = datetime.now(timezone.utc)
    for i in range(n):
        await p.send(completed(i, e2e=0.2 + 0.02 * i), at=now - timedelta(seconds=spread_s * (n - i) / n))
    await p.send(failed(0), at=now)


async def ledger(p: Publisher, size: int = 57) -> None:
    await p.send(
        LedgerCheckpoint(
            tree_size=size,
            root_hash="f0" * 32,
            signature="c2lnbmF0dXJl",
            key_id="ed25519:abc123",
            signed_at=datetime.now(timezone.utc),
        )
    )


async def scripted_run(p: Publisher) -> None:
    await fleet(p)
    await deployments(p)
    await traffic(p)
    await ledger(p)
    await p.dead_letter("model-store")
