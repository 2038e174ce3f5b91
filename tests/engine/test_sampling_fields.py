"""Penalties, logit bias and min-p in the batched sampler, against their oracles: transformers'
RepetitionPenaltyLogitsProcessor and MinPLogitsWarper, and a plain torch reference of OpenAI's
presence/frequency penalties. Mixed batches: rows without these fields must come out as before."""
from __future__ import annotations

import pytest
import torch

from services.inference_worker.engine import SamplingParams
from services.inference_worker.engine.sampling import Sampler

from .conftest import PROMPTS

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor  # noqa: E402

V = 12


def openai_penalties(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """https://platform.openai.com/docs/advanced-usage:
    mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = torch.zeros(logits.shape[-1])
    for t in output:
        counts[t] += 1
    return logits - counts * frequency - (counts > 0).float() * presence


def oracle(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The processed logits of one row (before temperature) as transformers/OpenAI define them."""
    x = logits.clone()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), x[None])[0]
    return openai_penalties(x, output, p.presence_penalty, p.frequency_penalty)


HISTORY = [([1, 2, 3], [4, 4, 5]), ([0, 7], [7, 7, 7, 1]), ([9], []), ([2, 2], [6, 11, 6])]
PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.7).resolve(),
    SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.8).resolve(),
    SamplingParams(temperature=0).resolve(),  # no field: the plain argmax
    SamplingParams(
        temperature=0, repetition_penalty=0.6, frequency_penalty=-1.0, logit_bias={3: 2.5, 8: -100}
    ).resolve(),
]


def test_greedy_equals_the_oracles_in_a_mixed_batch():
    torch.manual_seed(0)
    for _ in range(50):
        logits = torch.randn(len(PARAMS), V) * 3
        ids, _ = Sampler()(logits, PARAMS, [None] * len(PARAMS), HISTORY)
        want = [int(oracle(logits[i], p, *HISTORY[i]).argmax()) for i, p in enumerate(PARAMS)]
        assert ids == want
        assert ids[2] == int(logits[2].argmax())


def test_the_penalties_change_greedy_choices():
    """The oracle comparison above would pass vacuously if no penalty ever moved an argmax."""
    torch.manual_seed(0)
    moved = 0
    for _ in range(50):
        logits = torch.randn(len(PARAMS), V) * 3
        ids, _ = Sampler()(logits, PARAMS, [None] * len(PARAMS), HISTORY)
        moved += sum(ids[i] != int(logits[i].argmax()) for i in (0, 1, 3))
    assert moved > 20


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=1.3, min_p=0.2),
        SamplingParams(temperature=0.9, top_p=0.8, min_p=0.1, logit_bias={0: 1.5}),
    ],
)
def test_sampled_distribution_equals_the_oracle(params):
    torch.manual_seed(1)
    logits = torch.randn(V) * 2
    prompt, output = [1, 2, 3], [3, 4, 4]
    n = 20000
    p = params.resolve()
    ids, _ = Sampler()(logits.repeat(n, 1), [p] * n, [None] * n, [(prompt, output)] * n)
    got = torch.bincount(torch.tensor(ids), minlength=V).float() / n
    x = oracle(logits, p, prompt, output)[None] / p.temperature
    if p.top_p < 1:
        x = transformers.TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(None, x)
    want = x[0].softmax(-1)
    assert (got - want).abs().max() < 0.015, (got, want)
    if p.min_p:
        assert (want == 0).any() and (got[want == 0] == 0).all()  # min-p masked some tokens, never drawn


def test_logit_bias_100_forces_a_token_and_minus_100_bans_one():
    torch.manual_seed(2)
    logits = torch.randn(64, V) * 5
    params = [SamplingParams(temperature=1.0, logit_bias={5: 100}).resolve()] * 32 + [
        SamplingParams(temperature=0, logit_bias={int(t): -100}).resolve() for t in logits[32:].argmax(-1)
    ]
    ids, lps = Sampler()(logits, params, [None] * 64)
    assert ids[:32] == [5] * 32
    assert all(ids[i] != int(logits[i].argmax()) for i in range(32, 64))


def test_penalty_without_history_is_refused_and_bad_values_raise():
    with pytest.raises(ValueError, match="prompt and generated"):
        Sampler()(torch.zeros(1, V), [SamplingParams(presence_penalty=1).resolve()], [None])
    for bad in (
        dict(repetition_penalty=0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(min_p=1.5),
        dict(logit_bias={1: 101}),
        dict(logit_bias={-1: 1}),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_repetition_penalty_greedy_equals_transformers_generate(ckpts, engines):
    ck, eng = ckpts("llama"), engines("llama")
    changed = 0
    for prompt in PROMPTS:
        ids = eng.tokenizer.encode(prompt)
        out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8))[0]
        with torch.no_grad():
            ref = ck.hf.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                repetition_penalty=1.8,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids) :].tolist()
        assert out.token_ids[: len(ref)] == ref
        plain = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
        changed += plain.token_ids != out.token_ids
    assert changed >= 2  # the penalty visibly changes a random-weight model's output


def test_engine_presence_penalty_and_logit_bias(engines):
    eng = engines("llama")
    plain = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=100, temperature=0))[0]
    assert len(set(plain.token_ids)) < 100  # random weights repeat themselves
    p = SamplingParams(max_tokens=100, temperature=0, presence_penalty=2.0, frequency_penalty=1.0)
    fresh = eng.generate([PROMPTS[0]], p)[0]
    assert len(set(fresh.token_ids)) > len(set(plain.token_ids))
    # every token is the argmax of the OpenAI-penalized logits of a cache-free forward pass
    full = fresh.prompt_token_ids + fresh.token_ids
    P = len(fresh.prompt_token_ids)
    with torch.no_grad():
        logits = eng.ckpt.model.logits_without_cache(torch.tensor(full))
    for i, t in enumerate(fresh.token_ids):
        assert t == int(openai_penalties(logits[P + i - 1], fresh.token_ids[:i], 2.0, 1.0).argmax())
    forced = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.8, seed=3, logit_bias={42: 100}))[0]
    assert forced.token_ids == [42] * 6
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request(PROMPTS[0], SamplingParams(logit_bias={eng.model_config.vocab_size: 1}))
