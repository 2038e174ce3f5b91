"""bf16 / fp16: finite outputs, logits close to fp32, greedy agreement where fp32 is decisive."""
from __future__ import annotations

import math

import pytest
import torch

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import PROMPTS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype, ckpts, engines):
    ref = engines("qwen2")
    eng = LLMEngine.from_pretrained(ckpts("qwen2").path, EngineConfig(device="cpu", dtype=dtype,
                                                                      num_blocks=64))
    assert eng.dtype == dtype and eng.runner.kv_cache.dtype == dtype
    assert all(p.dtype == dtype for p in eng.ckpt.model.parameters())
    ids = torch.tensor(eng.tokenizer.encode(PROMPTS[3]))
    lo, hi = eng.ckpt.model.logits_without_cache(ids), ref.ckpt.model.logits_without_cache(ids)
    assert torch.isfinite(lo).all()
    err = (lo - hi).abs().max().item()
    print(f"{dtype}: max |logit - fp32 logit| = {err:.4f} (fp32 logit std {hi.std():.2f})")
    assert err < 0.1 * hi.std().item() * (4 if dtype == torch.bfloat16 else 1)

    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    outs, refs = eng.generate(PROMPTS, params), ref.generate(PROMPTS, params)
    decisive = 0
    for o, r in zip(outs, refs):
        assert len(o.token_ids) == 6
        assert all(math.isfinite(lp.logprob) for lp in o.logprobs)
        first = r.logprobs[0]
        if first.top[0][1] - first.top[1][1] > 0.3:  # fp32 is sure: half precision must agree
            decisive += 1
            assert o.token_ids[0] == r.token_ids[0]
            assert o.logprobs[0].logprob == pytest.approx(first.logprob, abs=0.15)
    assert decisive >= 2
