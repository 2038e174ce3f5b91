"""Every supported family against transformers, on small random-weight checkpoints (fp32, CPU): each
checkpoint sets what makes its family different (see FAMILY_SPECS), and the windowed ones get a prompt
about four windows long."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from services.inference_worker.engine import SamplingParams
from services.inference_worker.engine.weights import hf_weight_names
from shared.architectures import ENGINE_ARCHITECTURES
from .conftest import FAMILY_CLASSES, FAMILY_SPECS, PROMPTS, WINDOW, EngineConfig, LLMEngine, hf_greedy

LONG = " ".join(PROMPTS)
FAMILIES = list(FAMILY_SPECS)


def test_every_engine_architecture_has_a_test_checkpoint():
    tested = {FAMILY_CLASSES[spec["arch"]][1] for spec in FAMILY_SPECS.values()}
    tested |= {"LlamaForCausalLM", "Qwen2ForCausalLM"}  # test_oracle.py
    assert tested == set(ENGINE_ARCHITECTURES)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, ckpts, engines):
    ck, eng = ckpts(name), engines(name)
    ids = eng.tokenizer.encode(LONG)
    assert len(ids) > 3 * WINDOW
    ours = eng.ckpt.model.logits_without_cache(torch.tensor(ids))
    with torch.no_grad():
        ref = ck.hf(torch.tensor([ids])).logits[0].float()
    assert ref.std() > 0.5  # far from trivial, so 1e-4 means something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_32_tokens_identical_to_transformers(name, ckpts, engines):
    ck, eng = ckpts(name), engines(name)
    prompts = [LONG, PROMPTS[1]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(ck.hf, eng.tokenizer.encode(prompt), 32)
        assert len(ref) == 32 and out.finish_reason == "length"
        assert out.token_ids == ref, prompt


@pytest.mark.parametrize("prompt", [LONG, PROMPTS[1]], ids=["long-prompt-chunked", "grows-past"])
def test_longrope_encodes_a_long_sequence_with_the_long_factors_throughout(prompt, ckpts):
    """Phi-3's longrope switches factors at original_max_position_embeddings (32 here). A prompt
    past it, prefilled in chunks of 16, is long-encoded from its first chunk; a short one that
    grows past it re-encodes its cache once, as transformers' generate() does."""
    ck = ckpts("phi3")
    eng = LLMEngine.from_pretrained(ck.path, EngineConfig(
        device="cpu", dtype="float32", num_blocks=64, block_size=16, max_num_batched_tokens=16))
    ids = eng.tokenizer.encode(prompt)
    out = eng.generate([prompt], SamplingParams(max_tokens=32, temperature=0))[0]
    assert (len(ids) > 32) == (prompt is LONG) and len(ids) + 32 > 32
    assert out.token_ids == hf_greedy(ck.hf, ids, 32)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_equals_each_prompt_alone(name, engines):
    eng = engines(name)
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = [LONG, *PROMPTS]
    together = eng.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert eng.generate([prompt], params)[0].token_ids == out.token_ids, prompt


@pytest.mark.parametrize("name", FAMILIES)
def test_every_checkpoint_tensor_is_used(name, ckpts, engines):
    ck, cfg = ckpts(name), engines(name).model_config
    with safe_open(str(ck.path / "model.safetensors"), "pt") as f:
        in_file = set(f.keys())
    mapped = {hf for srcs in hf_weight_names(cfg).values() for hf in srcs}
    assert mapped == in_file


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_is_as_close_to_fp32_as_transformers_in_that_dtype(name, dtype, ckpts):
    """Loaded in bf16 / fp16, each family's logits stray from the fp32 reference no more than
    transformers' own do in that dtype (rounding differs in order, so 1.5x theirs plus a little).
    Compared per token: where a router's k-th and (k+1)-th experts nearly tie, either side's
    rounding may flip the choice (seen: Qwen3-MoE bf16, one token of 92, top-2 gap 0.007), so an
    MoE is held to the 95th percentile of tokens and a dense model to every token."""
    ck = ckpts(name)
    eng = LLMEngine.from_pretrained(ck.path, EngineConfig(device="cpu", dtype=dtype, num_blocks=16))
    ids = torch.tensor(eng.tokenizer.encode(LONG))
    with torch.no_grad():
        ref = ck.hf(ids[None]).logits[0].float()
        theirs = (copy.deepcopy(ck.hf).to(dtype)(ids[None]).logits[0].float() - ref).abs().amax(-1)
    ours = (eng.ckpt.model.logits_without_cache(ids).float() - ref).abs().amax(-1)
    assert eng.ckpt.model.embed.weight.dtype == dtype
    assert torch.isfinite(ours).all() and theirs.min() > 0
    q = 0.95 if eng.model_config.num_experts else 1.0
    assert ours.quantile(q) <= 1.5 * theirs.quantile(q) + 0.02, (ours.quantile(q), theirs.quantile(q))
    assert ours.median() <= 1.2 * theirs.median() + 0.005, (ours.median(), theirs.median())
