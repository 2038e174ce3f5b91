"""Fixtures for the ledger's tests: a real nats-server, the ledger service, and a scripted run of
the platform's events (dataset, model, deploy, inferences) published through JetStream."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest

from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from shared import bus
from shared.events import (
    DatasetRegistered, DeployLoading, DeployReady, DeployRequested, DeployScheduled, DeviceInfo, Event,
    InferenceCompleted, MeasuredMemory, ModelId, ModelRegistered, NodeRegistered, Source, make_event,
)
from shared.prompt_commitment import commit, new_salt, prompt_bytes
from shared.service import Service
from tests.support.helpers import eventually, make_service


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


DATASET = sha("dataset: tiny-shakespeare")
OTHER_DATASET = sha("dataset: gutenberg")
MODEL = ModelId(name="tiny", version=1, digest=sha("manifest tiny v1"))
TRAINING_RECORD = sha("training run 1")
NODE, DEVICE = "node-a", "cuda:0"


@dataclass
class ScriptedRun:
    events: list[Event[Any]] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {e.id for e in self.events}

    def request_ids(self) -> list[str]:
        return [e.data.request_id for e in self.events if e.type == "inference.completed"]


def scripted_events(inferences: int = 20) -> ScriptedRun:
    src = lambda service: Source(service=service, node=NODE)  # noqa: E731
    run = ScriptedRun()
    add = lambda data, service: run.events.append(make_event(data, src(service)))  # noqa: E731
    add(
        NodeRegistered(
            node_id=NODE,
            hostname="gpu-box",
            cpu_model="EPYC",
            cpu_cores=16,
            ram_total=2**36,
            devices=[
                DeviceInfo(
                    id=DEVICE,
                    kind="cuda",
                    name="NVIDIA H100",
                    memory_total=80 * 2**30,
                    memory_free=79 * 2**30,
                    uuid="GPU-1234",
                    compute_capability="9.0",
                    driver="550.54",
                )
            ],
        ),
        "hardware-inventory",
    )
    add(
        DatasetRegistered(
            name="tiny-shakespeare",
            digest=DATASET,
            files={"input.txt": "ab" * 32},
            source="https://example.org/ts",
            license="public-domain",
        ),
        "model-store",
    )
    add(
        DatasetRegistered(name="gutenberg", digest=OTHER_DATASET, files={"a.txt": "cd" * 32}, license="public-domain"),
        "model-store",
    )
    add(
        ModelRegistered(
            model=MODEL,
            architecture="LlamaForCausalLM",
            parameters=1_000_000,
            datasets=[DATASET, OTHER_DATASET],
            training_record=TRAINING_RECORD,
            license="apache-2.0",
        ),
        "model-store",
    )
    add(DeployRequested(deployment_id="dep-1", model_ref="tiny:1"), "client")
    add(
        DeployScheduled(
            deployment_id="dep-1", model=MODEL, node_id=NODE, device=DEVICE, predicted_bytes=2**30, context_length=2048
        ),
        "hardware-inventory",
    )
    add(DeployLoading(deployment_id="dep-1", model=MODEL, node_id=NODE, device=DEVICE), "inference-worker")
    add(
        DeployReady(
            deployment_id="dep-1",
            model=MODEL,
            node_id=NODE,
            device=DEVICE,
            measured=MeasuredMemory(weights=2**29, kv_cache=2**28, peak=2**30),
            load_seconds=1.5,
        ),
        "inference-worker",
    )
    for i in range(inferences):
        add(
            inference_completed(
                f"req-{i}", prompt=f"p{i}", salt=new_salt(), prompt_tokens=10 + i, trace_id=f"{i:032x}"
            ),
            "inference-worker",
        )
    return run


def inference_completed(
    request_id: str, *, prompt: str, salt: str, api_key_id: str | None = None, **fields: Any
) -> InferenceCompleted:
    """A worker's event for one request on the scripted deployment, committing to ``prompt`` with ``salt``."""
    defaults: dict[str, Any] = dict(
        model=MODEL,
        deployment_id="dep-1",
        node_id=NODE,
        device=DEVICE,
        prompt_tokens=10,
        completion_tokens=20,
        queue_seconds=0.001,
        time_to_first_token_seconds=0.02,
        time_per_output_token_seconds=0.01,
        e2e_seconds=0.3,
        finish_reason="stop",
        output_sha256=hashlib.sha256(f"answer to {prompt}".encode()).hexdigest(),
    )
    return InferenceCompleted(
        request_id=request_id,
        prompt_commitment=commit(prompt_bytes(prompt=prompt), salt),
        api_key_id=api_key_id,
        **{**defaults, **fields},
    )


async def publish_all(js, events: list[Event[Any]], *, msg_id: bool = True) -> None:
    for e in events:
        await js.publish(e.subject, e.to_bytes(), headers={"Nats-Msg-Id": e.id} if msg_id else None)


@pytest.fixture
async def js(nats_server) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


@pytest.fixture
def ledger_service(nats_server, tmp_path, monkeypatch) -> Service:
    monkeypatch.setenv("STRATA_LEDGER_CHECKPOINT_SECONDS", "0.5")
    return make_service("provenance-ledger", nats_server.url, tmp_path / "data")


def ledger_of(service: Service):
    return service.part(LedgerApp).ledger


def non_checkpoint_ids(service: Service) -> list[str]:
    rows = ledger_of(service).store.query("SELECT event_id FROM leaves WHERE type != 'ledger.checkpoint' ORDER BY idx")
    return [r["event_id"] for r in rows]


def leaf_index_of(service: Service, event_id: str) -> int:
    """Where an event landed: the ledger's timed checkpoints (every 0.5 s here) are leaves too, so under
    load one may fall between two published events and an event's index is not its position in the run."""
    [row] = ledger_of(service).store.query("SELECT idx FROM leaves WHERE event_id = ?", (event_id,))
    return row["idx"]


async def wait_ingested(service: Service, ids: set[str], timeout: float = 20.0) -> None:
    await eventually(lambda: ids <= set(non_checkpoint_ids(service)), timeout, f"{len(ids)} events in the ledger")
