"""The engine with the Triton kernels (run by Triton's CPU interpreter here, compiled on a GPU)
gives the same tokens as with the torch references: catches layout/stride mismatches between the
model and the kernels before a GPU run."""
from __future__ import annotations

import pytest

from services.inference_worker import kernels
from services.inference_worker.engine import SamplingParams

from .conftest import PROMPTS


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_give_the_same_generation(engines, monkeypatch):
    eng = engines("qwen2")  # GQA, q/k/v bias
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3)
    prompts = [PROMPTS[0], PROMPTS[3]]
    ref = eng.generate(prompts, params)
    calls = []
    real = kernels.use_triton
    monkeypatch.setattr(kernels, "use_triton", lambda t: calls.append(1) or True)
    tri = eng.generate(prompts, params)
    monkeypatch.setattr(kernels, "use_triton", real)
    assert calls  # the dispatchers really took the Triton path
    for a, b in zip(tri, ref):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
