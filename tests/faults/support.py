"""What the fault cases share: events to publish, a consumer that counts every handler call by event
id, real worker processes on the shipped built-in checkpoint, and deploying to them as
hardware-inventory would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

from builtin_model import MODEL_DIR
from cli.natsd import free_port
from shared import bus, subjects
from shared.events import (
    DeployReady, DeployScheduled, Event, InferenceCompleted, ModelId, Source, make_event, parse_event,
)
from shared.service import Service
from tests.support.helpers import eventually, settings_for

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_CKPT = MODEL_DIR
MODEL = ModelId(name="fault-model", version=1, digest="sha256:" + "fa" * 32)
WORKER_SOURCE = Source(service="inference-worker", node="node-fault")
INVENTORY = Source(service="hardware-inventory", node="node-fault")
KV_BYTES = 4 << 20


def completed_event(i: int, tag: str) -> Event[InferenceCompleted]:
    """A small persistent event every consumer of evt.> sees (the ledger logs it)."""
    return make_event(InferenceCompleted(
        request_id=f"{tag}-{i}", model=MODEL, deployment_id="d-fault", node_id="node-fault", device="cpu",
        prompt_tokens=1, completion_tokens=1, queue_seconds=0, time_to_first_token_seconds=0,
        time_per_output_token_seconds=0, e2e_seconds=0, finish_reason="stop", prompt_commitment="0" * 64,
        output_sha256="1" * 64), WORKER_SOURCE)


@dataclass
class CountingConsumer:
    """A bare service with a durable pull consumer (the foundation's EventConsumer) on evt.inference.>,
    counting how many times its handler ran for each event id."""

    service: Service
    calls: Counter[str] = field(default_factory=Counter)

    @classmethod
    def build(cls, nats_url: str, data_dir: Path, name: str = "fault-consumer") -> CountingConsumer:
        counting = cls(Service(name, settings_for(name, nats_url, data_dir)))
        consumer = counting.service.consume("evt.inference.>", ack_wait_s=5.0, retry_delay_s=0.05)

        async def handle(event: Event) -> None:
            counting.calls[event.id] += 1

        consumer.on_any(handle)
        return counting


@dataclass
class PublishTally:
    """Events published through the real bus.publish (retries included): acknowledged or failed."""

    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    async def publish(self, service: Service, event: Event) -> None:
        try:
            await bus.publish(service.broker, event)
        except Exception:  # an explicit failure the caller saw: counted, never silent
            self.failed.append(event.id)
        else:
            self.acked.append(event.id)


def exactly_once(acked: list[str], calls: Counter[str]) -> tuple[int, int]:
    """(lost, duplicated): acknowledged events never handled, and events handled more than once."""
    return sum(1 for event_id in acked if calls[event_id] == 0), sum(1 for n in calls.values() if n > 1)


# -- real worker processes -------------------------------------------------------------------------
def spawn_worker(nats_url: str, data_dir: Path, node_id: str, **env: str) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "STRATA_NATS_URL": nats_url, "STRATA_DATA_DIR": str(data_dir), "STRATA_NODE_ID": node_id,
               "STRATA_INFERENCE_WORKER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
               "STRATA_FAULTS_CHECKPOINTS": json.dumps({MODEL.name: str(BUILTIN_CKPT)}), **env}
    log = (data_dir / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.worker_main"], cwd=ROOT, env=environ,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.health_url = f"http://127.0.0.1:{environ['STRATA_INFERENCE_WORKER_PORT']}/healthz"  # type: ignore[attr-defined]
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class EventWatch:
    """Every event on evt.> as a plain core-NATS subscriber sees it (the test's eyes, not a service)."""

    nc: Client
    seen: list[Event] = field(default_factory=list)

    @classmethod
    async def connect(cls, nats_url: str) -> EventWatch:
        nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await bus.ensure_streams(nc.jetstream())
        watch = cls(nc)

        async def collect(msg) -> None:
            watch.seen.append(parse_event(msg.data, msg.subject))

        await nc.subscribe("evt.>", cb=collect)
        return watch

    def of(self, data_cls: type, **match) -> list:
        return [e.data for e in self.seen if isinstance(e.data, data_cls)
                and all(getattr(e.data, k) == v for k, v in match.items())]

    async def deploy(self, node_ids: list[str], timeout: float = 90.0) -> None:
        """Schedule the model on each node as hardware-inventory would; wait until every one is ready."""
        js = self.nc.jetstream()
        for node_id in node_ids:
            event = make_event(DeployScheduled(
                deployment_id=f"dep-{node_id}", model=MODEL, node_id=node_id, device="cpu", predicted_bytes=1,
                context_length=256, model_ref=f"{MODEL.name}:1", kv_cache_bytes=KV_BYTES, dtype="float32"), INVENTORY)
            await js.publish(
                event.subject, event.to_bytes(), stream=subjects.EVENTS_STREAM, headers={"Nats-Msg-Id": event.id}
            )
        await eventually(
            lambda: {r.node_id for r in self.of(DeployReady)} >= set(node_ids), timeout, f"deploy.ready from {node_ids}"
        )
