"""Correctness against HF transformers on small random-weight checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from .conftest import PROMPTS, hf_greedy

LONG = " ".join(PROMPTS)  # ~100 tokens: positions well past llama3's original_max (32)
ALL = ["llama", "qwen2", "llama3", "tied", "sharded", "mistral"]


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(name, ckpts, engines):
    ck, eng = ckpts(name), engines(name)
    ids = eng.tokenizer.encode(LONG)
    assert len(ids) > 64
    ours = eng.ckpt.model.logits_without_cache(torch.tensor(ids))
    with torch.no_grad():
        ref = ck.hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (len(ids), ck.vocab)
    assert ref.std() > 0.5  # the logits are far from trivial, so 1e-4 means something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3", "tied", "sharded"])
def test_greedy_32_tokens_identical_to_transformers(name, ckpts, engines):
    ck, eng = ckpts(name), engines(name)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_greedy(ck.hf, eng.tokenizer.encode(prompt), 32)
        assert len(ref) == 32 and out.finish_reason == "length"
        assert out.token_ids == ref, prompt


def test_batch_equals_each_prompt_alone(engines):
    eng = engines("qwen2")
    params = SamplingParams(max_tokens=20, temperature=0)
    together = eng.generate(PROMPTS, params)
    assert len({len(eng.tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # all lengths differ
    for prompt, out in zip(PROMPTS, together):
        assert eng.generate([prompt], params)[0].token_ids == out.token_ids


def test_cached_decode_equals_full_forward(ckpts, engines):
    """Every decode step's distribution (paged cache) equals a cache-free forward over the whole
    sequence, both ours and transformers'."""
    ck, eng = ckpts("llama3"), engines("llama3")
    vocab = ck.vocab
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, logprobs=vocab))[0]
    full = out.prompt_token_ids + out.token_ids
    ours_full = eng.ckpt.model.logits_without_cache(torch.tensor(full)).log_softmax(-1)
    with torch.no_grad():
        hf_full = ck.hf(torch.tensor([full])).logits[0].float().log_softmax(-1)
    P = len(out.prompt_token_ids)
    for i, lp in enumerate(out.logprobs):
        dense = torch.full((vocab,), float("nan"))
        ids, vals = zip(*lp.top)
        dense[list(ids)] = torch.tensor(vals)
        torch.testing.assert_close(dense, ours_full[P - 1 + i], atol=1e-4, rtol=0)
        torch.testing.assert_close(dense, hf_full[P - 1 + i], atol=1e-4, rtol=0)
        assert lp.token_id == out.token_ids[i] == int(hf_full[P - 1 + i].argmax())


def test_chunked_prefill_matches_transformers(ckpts):
    """Prompts longer than the per-step token budget are prefilled in chunks that attend to the
    cached prefix; the result must not change."""
    ck = ckpts("qwen2")
    eng = LLMEngine.from_pretrained(ck.path, EngineConfig(device="cpu", num_blocks=64, block_size=8,
                                                          max_num_batched_tokens=12))
    prompts = [LONG, PROMPTS[3], PROMPTS[0]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ck.hf, eng.tokenizer.encode(prompt), 12)


def test_requests_joining_mid_flight_mix_prefill_and_decode(engines):
    eng = engines("llama")
    params = SamplingParams(max_tokens=16, temperature=0)
    alone = [o.token_ids for o in eng.generate(PROMPTS, params)]
    steps = []
    real_run = eng.runner.run

    def spy(batch):
        steps.append(sorted(s.num_tokens for s in batch))
        return real_run(batch)

    eng.runner.run = spy
    try:
        rids, done = [], {}
        for prompt in PROMPTS:  # a new request every other step
            rids.append(eng.add_request(prompt, params))
            for _ in range(2):
                done.update({o.request_id: o for o in eng.step() if o.finished})
        while eng.has_unfinished():
            done.update({o.request_id: o for o in eng.step() if o.finished})
    finally:
        del eng.runner.run
    assert [done[r].token_ids for r in rids] == alone
    assert any(s[0] == 1 and s[-1] > 1 for s in steps), steps  # decode + prefill in one step
