"""The worker's embeddings handler (service_layer/embedding.py) over a real engine, without NATS: the
reply messages in order (keepalives while the engine has not run it, the vectors in parts, one RpcReply
last), typed errors, the request held in flight for an unload to drain, and the inference.embedded event."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import numpy as np
import pytest

from services.inference_worker.adapters.engine_loop import EngineLoop
from services.inference_worker.engine import EngineConfig, LLMEngine
from services.inference_worker.service_layer.deployments import Deployment, Deployments
from services.inference_worker.service_layer.embedding import Embedder
from shared import embeddings as contract
from shared.embeddings import EmbeddingPart, EmbeddingReply, EmbeddingRequest
from shared.events import EmbeddingsCompleted
from shared.inference_client import is_keepalive
from shared.rpc import RpcReply
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, model_id  # noqa: F401  (ckpts: a fixture)

TEXTS = ["The quick brown fox", "Call me Ishmael.", "It was"]


@pytest.fixture
def reference(ckpts):  # noqa: F811
    """A second engine over the same checkpoint: the served one is stepped by its loop's thread alone."""
    return LLMEngine.from_pretrained(ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=32))


@pytest.fixture
def served(ckpts):  # noqa: F811
    """An Embedder over one ready deployment whose engine loop is *not* stepping until the test starts it."""
    engine = LLMEngine.from_pretrained(ckpts["tiny"], EngineConfig(device="cpu", dtype="float32", num_blocks=32))
    loop = EngineLoop(engine, name="tiny")
    events: list = []

    async def publish(data) -> None:
        events.append(data)

    async def on_serving(_name: str, _serving: bool) -> None:
        pass

    deployments = Deployments("node-a", None, publish, on_serving)  # type: ignore[arg-type]  # no artifacts: nothing loads
    dep = Deployment(key="dep-tiny/0", deployment_id="dep-tiny", replica=0, generation=0, model=model_id("tiny"),
                     device="cpu", state="ready", loop=loop)
    deployments.by_key[dep.key] = dep
    yield Embedder(deployments, "node-a", publish), dep, events
    loop.stop()


async def run(embedder: Embedder, request: EmbeddingRequest | bytes, subject_model: str = "tiny", *,
              attributed: bool = False) -> list[bytes]:
    sent: list[bytes] = []

    async def send(body: bytes) -> None:
        sent.append(body)

    raw = request if isinstance(request, bytes) else request.model_dump_json().encode()
    await embedder.handle(raw, None, subject_model, send, attributed=attributed)
    return sent


async def test_keepalives_while_waiting_then_the_parts_then_one_reply_and_the_event(served, reference, monkeypatch):
    embedder, dep, events = served
    monkeypatch.setattr(contract, "PART_BYTES", 700)  # a 64-float vector is 344 base64 characters: 2 a part
    request = EmbeddingRequest(model="tiny", inputs=TEXTS * 2, client_request_id="c-1")
    task = asyncio.ensure_future(
        run(embedder, request, attributed=True)
    )  # as from the gateway: it names the caller's id
    await asyncio.sleep(1.3)  # the engine is not stepping: the request waits, and says it is alive
    assert not task.done() and request.request_id in dep.inflight, "an unload would wait for it"
    dep.loop.start()
    sent = await asyncio.wait_for(task, 30)
    keepalives = [b for b in sent if is_keepalive(b)]
    assert len(keepalives) >= 2, "every KEEPALIVE_S / 2"
    rest = sent[len(keepalives) :]
    parts = [EmbeddingPart.model_validate_json(b) for b in rest[:-1]]
    assert [p.start for p in parts] == [0, 2, 4] and sum(len(p.vectors) for p in parts) == 6
    rpc = RpcReply.model_validate_json(rest[-1])
    assert rpc.ok, rpc.error
    reply = EmbeddingReply.model_validate(rpc.result)
    vectors = [v for p in parts for v in p.vectors]
    want = reference.embed(TEXTS * 2)
    got = np.array([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors])
    np.testing.assert_allclose(got, want.vectors.numpy(), atol=1e-5)
    assert reply.count == 6 and reply.dimensions == 64 and reply.pooling == "last"
    assert reply.prompt_tokens == sum(want.prompt_tokens)
    assert request.request_id not in dep.inflight
    (event,) = events
    assert isinstance(event, EmbeddingsCompleted) and event.request_id == request.request_id
    assert event.inputs == 6 and event.client_request_id == "c-1" and event.deployment_id == "dep-tiny"
    assert event.output_sha256 == hashlib.sha256(b"".join(base64.b64decode(v) for v in vectors)).hexdigest()


async def test_dimensions_cut_and_renormalise(served, reference):
    embedder, dep, _ = served
    dep.loop.start()
    sent = await run(embedder, EmbeddingRequest(model="tiny", inputs=TEXTS, dimensions=8))
    part = EmbeddingPart.model_validate_json(sent[-2])
    got = np.array([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in part.vectors])
    head = reference.embed(TEXTS).vectors[:, :8].numpy()
    np.testing.assert_allclose(got, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize(
    "body, code, words",
    [
        (
            EmbeddingRequest(model="tiny", inputs=[[5] * 600]),
            "context_length_exceeded",
            "maximum context length is 512",
        ),
        (EmbeddingRequest(model="tiny", inputs=["ok", []]), "invalid", "input 1 is empty"),
        (EmbeddingRequest(model="tiny", inputs=[[10**7]]), "invalid", "outside the vocabulary"),
        (EmbeddingRequest(model="tiny", inputs=["a"], dimensions=65), "invalid", "over this model's 64"),
        (EmbeddingRequest(model="tiny:2", inputs=["a"]), "not_found", "not deployed on this worker"),
        (b'{"model": "tiny", "inputs": []}', "invalid", "invalid EmbeddingRequest"),
        (b'{"model": "tiny", "inputs": ["a"], "pooling": "mean"}', "invalid", "Extra inputs are not permitted"),
    ],
)
async def test_refusals_are_typed_replies_and_publish_nothing(served, body, code, words):
    embedder, dep, events = served
    dep.loop.start()
    (only,) = await run(embedder, body)
    rpc = RpcReply.model_validate_json(only)
    assert not rpc.ok and rpc.error.code == code and words in rpc.error.message, rpc.error
    assert events == [] and not dep.inflight


async def test_a_request_sent_to_another_models_subject_is_refused(served):
    embedder, dep, _ = served
    (only,) = await run(embedder, EmbeddingRequest(model="tiny", inputs=["a"]), subject_model="other")
    assert "sent to the subject of 'other'" in RpcReply.model_validate_json(only).error.message


async def test_a_cancel_or_an_unload_answers_a_waiting_request_with_unavailable(served):
    embedder, dep, events = served
    request = EmbeddingRequest(model="tiny", inputs=TEXTS)
    task = asyncio.ensure_future(
        run(embedder, request, attributed=True)
    )  # as from the gateway: it names the caller's id
    await asyncio.sleep(0.2)
    assert embedder.cancel(request.request_id), "infer.cancel reaches the engine job"
    sent = await asyncio.wait_for(task, 10)
    rpc = RpcReply.model_validate_json(sent[-1])
    assert not rpc.ok and rpc.error.code == "unavailable" and "stopped" in rpc.error.message
    assert not embedder.running and not embedder.cancel(request.request_id)

    task = asyncio.ensure_future(run(embedder, EmbeddingRequest(model="tiny", inputs=TEXTS)))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(dep.loop.stop)  # what an unload does once its drain times out
    sent = await asyncio.wait_for(task, 10)
    rpc = RpcReply.model_validate_json(sent[-1])
    assert not rpc.ok and rpc.error.code == "unavailable" and "being unloaded" in rpc.error.message, rpc.error
    assert events == []


async def test_a_duplicate_request_id_is_a_conflict_and_a_full_worker_says_overloaded(served):
    embedder, dep, _ = served
    first = EmbeddingRequest(model="tiny", inputs=TEXTS)
    task = asyncio.ensure_future(run(embedder, first))
    await asyncio.sleep(0.2)  # waiting: the engine loop is not stepping
    (again,) = await run(embedder, first)
    assert RpcReply.model_validate_json(again).error.code == "conflict"
    embedder.max_inflight = 1
    (full,) = await run(embedder, EmbeddingRequest(model="tiny", inputs=TEXTS))
    error = RpcReply.model_validate_json(full).error
    assert error.code == "unavailable" and "overloaded" in error.message
    dep.loop.start()
    assert RpcReply.model_validate_json((await asyncio.wait_for(task, 10))[-1]).ok
