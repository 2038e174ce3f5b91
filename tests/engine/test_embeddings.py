"""Embeddings from the engine against transformers: the base model's ``last_hidden_state`` (after the
final norm), pooled (last token or mean over the prompt) and L2-normalised, on the tiny random-weight
checkpoints; batches of different lengths, token-id inputs, the checkpoint's pooling, and an embedding
taken while a generation runs in the same engine."""
from __future__ import annotations

import json

import pytest
import torch

from services.inference_worker import kernels
from services.inference_worker.engine import ContextLengthError, InvalidRequestError, SamplingParams
from services.inference_worker.engine.embedding import checkpoint_pooling, pool, truncate

from .conftest import PROMPTS, transformers

ATOL = 2e-5


def hf_embeddings(path, prompts: list[list[int]], how: str) -> torch.Tensor:
    """transformers' AutoModel (the decoder without its LM head) over one right-padded batch."""
    model = transformers.AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if how == "last":  # right padding: each prompt's last real token, not the batch's last column
        pooled = hidden[torch.arange(len(prompts)), mask.sum(1) - 1]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("how", ["last", "mean"])
def test_pooled_embeddings_match_transformers(name, how, ckpts, engines):
    engine = engines(name)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]  # lengths 3 to 20: a ragged batch
    assert len({len(p) for p in prompts}) > 3
    out = engine.embed(PROMPTS, pooling=how)
    assert out.vectors.shape == (len(PROMPTS), engine.model_config.hidden_size)
    assert out.prompt_tokens == [len(p) for p in prompts] and out.pooling == how
    torch.testing.assert_close(out.vectors, hf_embeddings(ckpts(name).path, prompts, how), atol=ATOL, rtol=0)
    assert torch.allclose(out.vectors.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-6)


def test_token_ids_and_text_embed_alike_and_a_batch_equals_each_alone(engines):
    engine = engines("llama")
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    batch = engine.embed(ids).vectors
    torch.testing.assert_close(batch, engine.embed(PROMPTS[:3]).vectors, atol=0, rtol=0)
    for i, p in enumerate(ids):
        torch.testing.assert_close(engine.embed([p]).vectors[0], batch[i], atol=ATOL, rtol=0)


def test_a_batch_over_max_num_batched_tokens_runs_in_slices_and_matches(ckpts):
    from services.inference_worker.engine import EngineConfig, LLMEngine

    small = LLMEngine.from_pretrained(ckpts("llama").path, EngineConfig(
        device="cpu", dtype="float32", num_blocks=64, block_size=16, max_num_batched_tokens=24))
    prompts = [small.tokenizer.encode(p) for p in PROMPTS]
    future = small.submit_embedding(prompts)
    steps = 0
    while not future.done():
        small.step()
        steps += 1
    assert steps > 2, "a 5-prompt batch of ~60 tokens takes several 24-token steps"
    torch.testing.assert_close(future.result().vectors, hf_embeddings(ckpts("llama").path, prompts, "last"),
                               atol=ATOL, rtol=0)


def test_embedding_while_a_generation_runs_leaves_both_as_they_are_alone(engines):
    engine = engines("qwen2")
    greedy = SamplingParams(max_tokens=12, temperature=0)
    alone = engine.generate([PROMPTS[1]], greedy)[0].token_ids
    expected = engine.embed(PROMPTS).vectors
    rid = engine.add_request(PROMPTS[1], greedy)
    tokens: list[int] = []
    for _ in range(3):  # the generation holds KV blocks and is decoding
        for out in engine.step():
            assert out.request_id != rid
    assert engine.cache_usage().used_blocks > 0
    used = engine.cache_usage().used_blocks
    future = engine.submit_embedding(PROMPTS)
    done = None
    while done is None or not future.done():
        for out in engine.step():
            if out.request_id == rid:
                done = out
        if done is None:
            assert engine.cache_usage().used_blocks >= used, "embedding takes no block and frees none"
    tokens = done.token_ids
    assert tokens == alone, "the generation's tokens are those it makes alone"
    torch.testing.assert_close(future.result().vectors, expected, atol=ATOL, rtol=0)
    assert engine.cache_usage().used_blocks == 0


def test_invalid_inputs_are_refused_before_queueing(engines):
    engine = engines("llama")
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        engine.submit_embedding(["a", []])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.submit_embedding([[1, 10**6]])
    with pytest.raises(ContextLengthError) as over:
        engine.submit_embedding([[5] * (engine.max_model_len + 1)])
    assert over.value.prompt_tokens == engine.max_model_len + 1 and over.value.completion_tokens == 0
    assert engine.embed([[5] * engine.max_model_len]).prompt_tokens == [engine.max_model_len], "the whole context fits"
    with pytest.raises(InvalidRequestError, match="does not implement"):
        engine.submit_embedding(["a"], pooling="cls")
    assert not engine._embeddings


def test_pooling_comes_from_sentence_transformers_config(tmp_path):
    assert checkpoint_pooling(tmp_path) == "last", "a decoder LLM without a config pools its last token"
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    for mode, ours in (("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean"),
                       ("pooling_mode_cls_token", "pooling_mode_cls_token")):
        flags = {k: k == mode for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_lasttoken")}
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))
        assert checkpoint_pooling(tmp_path) == ours


def test_the_engine_pools_as_its_checkpoint_says(ckpts, tmp_path):
    import shutil

    from services.inference_worker.engine import EngineConfig, LLMEngine

    path = tmp_path / "st"
    shutil.copytree(ckpts("llama").path, path)
    (path / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                     "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    engine = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_blocks=32))
    assert engine.pooling == "mean"
    out = engine.embed(PROMPTS[:2])
    assert out.pooling == "mean"
    torch.testing.assert_close(out.vectors, engine.embed(PROMPTS[:2], pooling="mean").vectors, atol=0, rtol=0)


def test_pool_and_matryoshka_truncation():
    hidden = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(pool(hidden, [2, 1], "last"), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, [2, 1], "mean"), torch.tensor([[2.0, 2.0], [0.0, 2.0]]))
    v = torch.nn.functional.normalize(torch.tensor([[3.0, 4.0, 12.0]]), dim=-1)
    torch.testing.assert_close(truncate(v, 2), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ValueError, match="between 1 and"):
        truncate(v, 4)


def bare_decoder_checkpoint(root, tokenizer_dir, *, tied: bool):
    """Qwen3-Embedding's layout: a Qwen3 saved from the bare decoder (tensors without "model.", no
    lm_head), config.json still naming Qwen3ForCausalLM, and sentence-transformers' last-token pooling.
    ``tied`` False: an untied vocabulary whose LM head the files lack (an embedding-only checkpoint)."""
    import shutil

    from .conftest import build_checkpoint

    src = build_checkpoint(root / "src", tokenizer_dir, arch="qwen3", seed=21, head_dim=16, tie_word_embeddings=tied)
    path = root / ("qwen3-embedding" if tied else "qwen3-embedding-untied")
    src.hf.model.save_pretrained(path)  # the bare Qwen3Model: "layers.0...", "embed_tokens.weight"
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src.path / name, path / name)
    (path / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                     "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "embed_tokens.weight" in f.keys() and not any(k.startswith(("model.", "lm_head")) for k in f.keys())
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_a_qwen3_embedding_style_checkpoint_loads_and_embeds_as_transformers(tokenizer_dir, tmp_path, tied):
    from services.inference_worker.engine import EngineConfig, LLMEngine

    path = bare_decoder_checkpoint(tmp_path, tokenizer_dir, tied=tied)
    engine = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_blocks=32))
    assert engine.ckpt.model.can_generate is tied, "without its LM head it embeds only"
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    out = engine.embed(PROMPTS)
    assert out.pooling == "last"
    torch.testing.assert_close(out.vectors, hf_embeddings(path, prompts, "last"), atol=ATOL, rtol=0)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_give_the_same_embeddings(engines, monkeypatch):
    """The cache-free prefill under the Triton kernels (the CPU interpreter here, compiled on a GPU)."""
    engine = engines("qwen2")
    ref = engine.embed(PROMPTS[:3], pooling="mean").vectors
    calls = []
    monkeypatch.setattr(kernels, "use_triton", lambda t: calls.append(1) or True)
    tri = engine.embed(PROMPTS[:3], pooling="mean").vectors
    assert calls
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=0)


def test_a_cancelled_job_stops_queued_or_between_slices_and_a_stopped_engine_fails_the_rest(ckpts):
    from concurrent.futures import CancelledError

    from services.inference_worker.engine import EngineConfig, LLMEngine
    from services.inference_worker.engine.embedding import EmbeddingCancelled

    engine = LLMEngine.from_pretrained(ckpts("llama").path, EngineConfig(
        device="cpu", dtype="float32", num_blocks=64, block_size=16, max_num_batched_tokens=24))
    queued = engine.submit_embedding(PROMPTS)
    assert engine.cancel_embedding(queued) and queued.cancelled()
    engine.step()
    assert not engine._embeddings and not engine.cancel_embedding(queued)
    with pytest.raises(CancelledError):
        queued.result()

    running = engine.submit_embedding(PROMPTS)
    engine.step()  # its first slice ran: it cannot be cancelled as a future any more
    assert running.running() and engine.cancel_embedding(running, "the caller went away")
    engine.step()
    with pytest.raises(EmbeddingCancelled, match="the caller went away"):
        running.result(timeout=0)
    assert not engine._embeddings

    left = [engine.submit_embedding(PROMPTS), engine.submit_embedding(PROMPTS[:1])]
    engine.step()
    engine.fail_embeddings("the model is being unloaded")
    for future in left:  # the running one and the queued one
        with pytest.raises(EmbeddingCancelled, match="unloaded"):
            future.result(timeout=0)
    assert not engine.wait_for_work(timeout=0), "nothing left to step"


@pytest.mark.parametrize("how", ["last", "mean"])
def test_an_input_longer_than_a_step_is_prefilled_in_chunks_through_borrowed_blocks(ckpts, how):
    """Longer than max_num_batched_tokens: chunked through the paged cache (no activation peak beyond
    what the cache was sized for), the same vectors as transformers, every block back, a running
    generation untouched; with too few free blocks it runs in one piece, and still the same."""
    from services.inference_worker.engine import EngineConfig, LLMEngine
    from services.inference_worker.engine import embedding

    path = ckpts("qwen2").path
    engine = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_blocks=64, block_size=16,
                                                          max_num_batched_tokens=24))
    long = engine.tokenizer.encode(" ".join(PROMPTS * 3))
    assert len(long) > 3 * 24
    want = hf_embeddings(path, [long, engine.tokenizer.encode(PROMPTS[0])], how)
    chunked = []
    real = embedding.embed_in_chunks
    monkey = pytest.MonkeyPatch()
    monkey.setattr(embedding, "embed_in_chunks", lambda *a: chunked.append(a[2]) or real(*a))
    try:
        greedy = SamplingParams(max_tokens=8, temperature=0)
        alone = engine.generate([PROMPTS[1]], greedy)[0].token_ids
        rid = engine.add_request(PROMPTS[1], greedy)
        engine.step()
        used = engine.cache_usage().used_blocks
        future = engine.submit_embedding([long, PROMPTS[0]], pooling=how)
        tokens = None
        while tokens is None or not future.done():
            for out in engine.step():
                if out.request_id == rid:
                    tokens = out.token_ids
            assert engine.cache_usage().used_blocks <= used + 1, "the borrowed blocks are back after each step"
        assert chunked == [long], "only the long input took the chunked path"
        assert tokens == alone
        torch.testing.assert_close(future.result().vectors, want, atol=ATOL, rtol=0)
        assert engine.cache_usage().used_blocks == 0

        tiny = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_blocks=4, block_size=16,
                                                            max_num_batched_tokens=24))
        tiny.max_model_len = len(long)  # a cache of 64 tokens cannot borrow blocks for it: one piece
        torch.testing.assert_close(tiny.embed([long], pooling=how).vectors, want[:1], atol=ATOL, rtol=0)
        assert chunked == [long, long] and tiny.cache_usage().used_blocks == 0
    finally:
        monkey.undo()
