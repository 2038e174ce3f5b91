"""The memory prediction of a real (tiny, random-weight) Mixtral checkpoint pushed to model-store:
its weights term holds every expert's tensors, not only the ones a token is routed to."""

from __future__ import annotations

import httpx
import pytest
from safetensors import safe_open

from services.hardware_inventory.domain.fit import dtype_bytes, predict, shape_from_metadata
from shared.architectures import ENGINE
from shared.catalog import PushModelRequest, ResolvedModel
from tests.model_store.conftest import upload_dir
from tests.engine.conftest import tokenizer_dir  # noqa: F401  (fixture)
from tests.support.helpers import make_service

LAYERS, EXPERTS, PER_TOKEN, HIDDEN, INTER = 2, 4, 2, 64, 96


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=PER_TOKEN,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def tensor_bytes(directory, select) -> int:
    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                if select(name):
                    tensor = f.get_slice(name)
                    count = 1
                    for n in tensor.get_shape():
                        count *= n
                    total += count * dtype_bytes(tensor.get_dtype())
    return total


async def test_an_moe_checkpoints_weights_term_counts_every_expert(nats_server, tmp_path, mixtral):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store") as client,
    ):
        files = [f for f in await upload_dir(client, mixtral) if f.path != "generation_config.json"]
        answer = await client.post(
            "/v1/models", json=PushModelRequest(name="mixtral", files=files).model_dump(mode="json")
        )
    assert answer.status_code == 201, answer.text
    meta = ResolvedModel.model_validate(answer.json()).manifest.metadata
    assert (meta.runtime, meta.num_experts, meta.num_experts_per_tok) == (ENGINE, EXPERTS, PER_TOKEN)

    experts = tensor_bytes(mixtral, lambda name: ".experts." in name)
    assert experts == LAYERS * EXPERTS * 3 * HIDDEN * INTER * 4  # w1, w2, w3 of every expert in float32
    estimate = predict(shape_from_metadata(meta), "cuda")
    assert estimate.weights == tensor_bytes(mixtral, lambda name: True) >= experts
    assert estimate.weights - experts == tensor_bytes(mixtral, lambda name: ".experts." not in name)
    dense = predict(
        shape_from_metadata(meta).model_copy(update={"num_experts": None, "num_experts_per_tok": None}), "cuda"
    )
    assert estimate.activations > dense.activations  # both routed experts' activations, and the router's logits


async def test_the_booked_kv_cache_holds_the_whole_context_in_the_engine(nats_server, tmp_path, tokenizer_dir):  # noqa: F811
    """What fit books for the KV cache, given to the engine, serves the booked context to its last
    token (the engine's null block comes out of the same bytes: without it 128 became 112)."""
    from services.inference_worker.engine import EngineConfig, LLMEngine
    from tests.engine.conftest import build_checkpoint

    checkpoint = build_checkpoint(
        tmp_path / "ckpt",
        tokenizer_dir,
        arch="mixtral",
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
    ).path
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store") as client,
    ):
        files = [f for f in await upload_dir(client, checkpoint) if f.path != "generation_config.json"]
        answer = await client.post(
            "/v1/models", json=PushModelRequest(name="mixtral", files=files).model_dump(mode="json")
        )
    meta = ResolvedModel.model_validate(answer.json()).manifest.metadata
    for context in (128, 100):
        estimate = predict(shape_from_metadata(meta), "cpu", context_length=context)
        engine = LLMEngine.from_pretrained(
            checkpoint,
            EngineConfig(device="cpu", dtype=estimate.dtype, kv_cache_bytes=estimate.kv_cache, max_model_len=context),
        )
        assert engine.max_model_len == context, (context, engine.runner.num_blocks)
