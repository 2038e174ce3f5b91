"""Engine behaviour: preemption, cancellation, stop conditions, sampling, streaming, timings."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from services.inference_worker.engine import (
    ContextLengthError,
    EngineConfig,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
)
from .conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def run_all(eng: LLMEngine) -> dict:
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    return done


def test_preemption_completes_every_request_with_same_tokens(ckpts, engines):
    big = engines("llama")
    small = LLMEngine.from_pretrained(
        ckpts("llama").path, EngineConfig(device="cpu", num_blocks=12, block_size=4)
    )  # 48 tokens for 5 requests of ~35
    assert small.max_model_len == 48
    greedy = SamplingParams(max_tokens=20, temperature=0)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=11)
    prompts = PROMPTS[:3] + [PROMPTS[0], PROMPTS[2]]
    params = [greedy, seeded, greedy, seeded, greedy]
    expected = [o.token_ids for o in big.generate(prompts, params)]
    streams = {}
    rids = [
        small.add_request(p, sp, callback=lambda e: streams.setdefault(e.request_id, []).append(e))
        for p, sp in zip(prompts, params)
    ]
    done = run_all(small)
    assert small.scheduler.num_preemptions > 0
    assert any(done[r].metrics.num_preemptions for r in rids)
    assert [done[r].token_ids for r in rids] == expected
    for r in rids:  # each token streamed exactly once despite recomputation
        assert [t for e in streams[r] for t in e.token_ids] == done[r].token_ids
        assert "".join(e.text for e in streams[r]) == done[r].text
    assert small.cache_usage().used_blocks == 0


def test_request_too_long_for_cache_fails_clearly_others_complete(ckpts):
    eng = LLMEngine.from_pretrained(ckpts("llama").path, EngineConfig(device="cpu", num_blocks=4, block_size=4))
    long_prompt = " ".join(PROMPTS)
    outs = eng.generate([long_prompt, "It was"], SamplingParams(max_tokens=50, temperature=0))
    assert outs[0].finish_reason == "error" and outs[0].token_ids == []
    assert "prompt has" in outs[0].error and "16 tokens" in outs[0].error
    # the other request runs until the cache (= max_model_len) is full, then stops with "length"
    assert outs[1].finish_reason == "length"
    assert len(outs[1].prompt_token_ids) + len(outs[1].token_ids) == 16
    assert eng.cache_usage().used_blocks == 0


def test_invalid_prompts_are_reported_not_raised(engines):
    eng = engines("llama")
    outs = eng.generate([[], [10**6, 3]], GREEDY)
    assert [o.finish_reason for o in outs] == ["error", "error"]
    assert "empty" in outs[0].error and "vocabulary" in outs[1].error


def test_reject_invalid_raises_before_queueing_and_cap_max_tokens_false_checks_the_completion(ckpts):
    eng = LLMEngine.from_pretrained(ckpts("llama").path, EngineConfig(device="cpu", num_blocks=4, block_size=4))
    assert eng.max_model_len == 16
    ids = list(range(5, 15))  # 10 prompt tokens
    with pytest.raises(ContextLengthError) as caught:
        eng.add_request(list(range(5, 25)), SamplingParams(max_tokens=None), reject_invalid=True)
    assert (caught.value.max_model_len, caught.value.prompt_tokens, caught.value.completion_tokens) == (16, 20, 1)
    with pytest.raises(ContextLengthError) as caught:
        eng.add_request(ids, SamplingParams(max_tokens=7), reject_invalid=True, cap_max_tokens=False)
    assert (caught.value.prompt_tokens, caught.value.completion_tokens) == (10, 7)
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request([], SamplingParams(), reject_invalid=True)
    assert not eng.has_unfinished(), "nothing refused was queued"
    fits = eng.add_request(ids, SamplingParams(max_tokens=6, temperature=0), reject_invalid=True, cap_max_tokens=False)
    capped = eng.add_request(
        ids, SamplingParams(max_tokens=7, temperature=0), reject_invalid=True
    )  # the context cuts it
    refused = eng.add_request(
        ids, SamplingParams(max_tokens=7), cap_max_tokens=False
    )  # not raised: finishes with error
    done = run_all(eng)
    assert done[fits].finish_reason == "length" and len(done[fits].token_ids) == 6
    assert done[capped].finish_reason == "length" and len(done[capped].token_ids) == 6
    assert done[refused].finish_reason == "error" and "max_tokens 7" in done[refused].error


def test_cancel_frees_blocks_and_reports_cancelled(engines):
    eng = engines("llama")
    events = []
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=200, temperature=0), callback=events.append)
    other = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))
    for _ in range(3):
        eng.step()
    assert eng.cache_usage().used_blocks > 0
    assert eng.cancel(rid)
    outs = {o.request_id: o for o in eng.step()}
    assert outs[rid].finish_reason == "cancelled" and len(outs[rid].token_ids) >= 2
    assert events[-1].finished and events[-1].finish_reason == "cancelled"
    assert sum(len(e.token_ids) for e in events) == len(outs[rid].token_ids)
    run_all(eng)
    assert eng.cache_usage().used_blocks == 0
    assert not eng.cancel(rid) and not eng.cancel("no-such-request") and not eng.cancel(other)


def test_cancel_before_first_step(engines):
    eng = engines("llama")
    rid = eng.add_request("It was", GREEDY)
    assert eng.cancel(rid)
    (out,) = eng.step()
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert not eng.has_unfinished() and eng.cache_usage().used_blocks == 0


def test_max_tokens_and_stop_token_ids(engines):
    eng = engines("qwen2")
    base = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    stop_id = base.token_ids[7]
    cut = base.token_ids.index(stop_id)
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: cut + 1]
    assert out.text == eng.tokenizer.decode(base.token_ids[:cut])  # the stop token is not text


def test_stop_string_cut_and_never_streamed(engines):
    eng = engines("qwen2")
    base = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=32, temperature=0))[0]
    text = base.text
    start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    expected = text[: text.find(stop)]
    events = []
    eng.add_request(
        PROMPTS[2], SamplingParams(max_tokens=32, temperature=0, stop=["@@never@@", stop]), callback=events.append
    )
    (out,) = run_all(eng).values()
    assert out.finish_reason == "stop" and out.text == expected
    assert len(out.token_ids) < 32
    streamed = "".join(e.text for e in events)
    assert streamed == expected and stop not in streamed


def test_streaming_events_and_timings(engines):
    eng = engines("llama")
    events = []
    eng.add_request(PROMPTS[3], SamplingParams(max_tokens=10, temperature=0), callback=events.append)
    (out,) = run_all(eng).values()
    assert [t for e in events for t in e.token_ids] == out.token_ids
    assert "".join(e.text for e in events) == out.text == eng.tokenizer.decode(out.token_ids)
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    assert m.num_prompt_tokens == len(out.prompt_token_ids) and m.num_generated_tokens == 10
    assert m.queue_time >= 0 and m.ttft > 0 and m.tpot > 0 and m.e2e >= m.ttft


def test_seed_reproducible_regardless_of_batch(engines):
    eng = engines("llama")
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    alone = eng.generate([PROMPTS[0]], p)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=7), SamplingParams(max_tokens=16, temperature=0.7)]
    batch = eng.generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]], [others[0], p, others[1]])
    assert batch[1].token_ids == alone
    other_seed = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))
    assert other_seed[0].token_ids != alone
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0))[0].token_ids
    assert alone != greedy  # it really sampled


def test_top_k_1_and_tiny_top_p_equal_greedy(engines):
    eng = engines("qwen2")
    greedy = [o.token_ids for o in eng.generate(PROMPTS[:3], SamplingParams(max_tokens=16, temperature=0))]
    for p in (
        SamplingParams(max_tokens=16, temperature=1.5, top_k=1),
        SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6),
    ):
        assert [o.token_ids for o in eng.generate(PROMPTS[:3], p)] == greedy


def test_logprobs_shapes_and_normalisation(ckpts, engines):
    eng, vocab = engines("llama"), ckpts("llama").vocab
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=4))[0]
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        vals = [v for _, v in lp.top]
        assert len(lp.top) == 4 and vals == sorted(vals, reverse=True)
        assert dict(lp.top).get(tok, lp.logprob) == pytest.approx(lp.logprob, abs=1e-6)
    full = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, logprobs=vocab))[0]
    for lp in full.logprobs:
        assert len(lp.top) == vocab
        assert math.fsum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-4)
        assert lp.top[0] == (lp.token_id, lp.logprob)  # greedy picks the best
    none = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))[0]
    assert none.logprobs is None
    zero = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0, logprobs=0))[0]
    assert [lp.top for lp in zero.logprobs] == [[], []]


def test_chat_messages_use_the_template(engines):
    eng = engines("llama")
    msgs = [{"role": "user", "content": "Tell me a story."}]
    rid = eng.add_request(messages=msgs, params=SamplingParams(max_tokens=3, temperature=0))
    (out,) = [o for o in run_all(eng).values() if o.request_id == rid]
    assert out.prompt_token_ids == eng.tokenizer.encode_chat(msgs)
    assert out.prompt_token_ids[0] == eng.tokenizer.bos_token_id


def test_add_and_cancel_from_other_threads_while_stepping(engines):
    eng = engines("llama")
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = eng.generate(PROMPTS, params)
    rids, errors = [], []
    stop = threading.Event()

    def producer():
        try:
            for p in PROMPTS:
                rids.append(eng.add_request(p, params))
            victim = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=500, temperature=0))
            eng.cancel(victim)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
        finally:
            stop.set()

    assert not eng.wait_for_work(timeout=0.01)  # idle: times out
    t = threading.Thread(target=producer)
    done = {}
    t.start()
    assert eng.wait_for_work(timeout=10)  # woken by the producer's first request
    while not stop.is_set() or eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    t.join()
    assert not errors
    assert [done[r].token_ids for r in rids] == [o.token_ids for o in expected]
    assert eng.cache_usage().used_blocks == 0


def test_duplicate_request_id_and_bad_params_raise(engines):
    eng = engines("llama")
    eng.add_request("It was", GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("It was", GREEDY, request_id="dup")
    run_all(eng)
    for bad in (dict(top_p=0), dict(temperature=-1), dict(max_tokens=0), dict(top_k=-5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_cache_usage_report(engines):
    eng = engines("llama")
    u = eng.cache_usage()
    assert u.num_blocks == 256 and u.block_size == 16 and u.free_blocks == 256
    assert u.total_bytes == eng.runner.kv_cache.numel() * eng.runner.kv_cache.element_size()
    eng.add_request("It was", SamplingParams(max_tokens=40, temperature=0))
    eng.step()
    u = eng.cache_usage()
    assert u.used_blocks == 1 and u.used_bytes == u.bytes_per_block and 0 < u.usage < 1
    run_all(eng)
    assert eng.stats()["kv_blocks_used"] == 0


def test_generation_defaults_fill_unset_params(engines):
    eng = engines("llama")
    p = eng.default_sampling_params(max_tokens=3)
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)
    assert eng.eos_ids == {eng.tokenizer.eos_token_id}
    assert torch.is_tensor(eng.runner.kv_cache)


def test_failing_step_and_failing_callback_do_not_kill_the_engine(engines, monkeypatch):
    eng = engines("llama")
    real = eng.runner.run
    monkeypatch.setattr(eng.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    (out,) = eng.generate(["It was"], GREEDY)
    assert out.finish_reason == "error" and "boom" in out.error
    assert eng.cache_usage().used_blocks == 0
    monkeypatch.setattr(eng.runner, "run", real)

    def bad_callback(event):
        raise ValueError("client went away")

    eng.add_request("It was", SamplingParams(max_tokens=3, temperature=0), callback=bad_callback)
    (out,) = run_all(eng).values()
    assert out.finish_reason == "length" and len(out.token_ids) == 3
