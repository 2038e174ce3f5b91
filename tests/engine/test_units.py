"""Unit tests without a model: block manager, scheduler, sampler, stop-string streaming."""
from __future__ import annotations

import torch

from services.inference_worker.engine.block_manager import BlockManager
from services.inference_worker.engine.sampling import Sampler, SamplingParams, apply_top_k_top_p
from services.inference_worker.engine.scheduler import Scheduler
from services.inference_worker.engine.sequence import Sequence, Status


def seq(n_prompt: int, rid: str = "r", **params) -> Sequence:
    return Sequence(rid, list(range(2, 2 + n_prompt)), SamplingParams(**params).resolve(),
                    eos_ids={1}, detok=None, callback=None, generator=None)


def test_block_manager_all_or_nothing_and_free():
    bm = BlockManager(num_blocks=4, block_size=4, bytes_per_block=100)
    a, b = seq(5, "a"), seq(9, "b")
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    assert bm.ensure(a, 5) and len(a.block_table) == 2
    assert bm.ensure(a, 8) and len(a.block_table) == 2  # still fits
    assert not bm.can_hold(b, 9) and not bm.ensure(b, 9) and b.block_table == []  # needs 3, 2 free
    assert bm.ensure(b, 8)
    u = bm.usage()
    # total_bytes is the cache's memory: the 4 usable blocks and the null block
    assert (u.used_blocks, u.free_blocks, u.used_bytes, u.total_bytes) == (4, 0, 400, 500)
    assert set(a.block_table) | set(b.block_table) == {1, 2, 3, 4}  # none twice, never block 0
    a.num_computed = 5
    bm.free(a)
    assert a.block_table == [] and a.num_computed == 0 and bm.num_free == 2


def test_scheduler_chunks_prefill_under_token_budget_and_mixes_decode():
    bm = BlockManager(num_blocks=32, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(3, "a"), seq(25, "b")
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.samples) for s in batch] == [("a", 3, True), ("b", 7, False)]
    assert len(b.block_table) == 7  # the whole prompt is reserved up front
    for s in batch:
        s.seq.num_computed += s.num_tokens
    a.output_ids.append(5)
    batch = sch.schedule()  # a decodes (1 token), b continues its prefill (9 tokens)
    assert [(s.seq.request_id, s.num_tokens) for s in batch] == [("a", 1), ("b", 9)]


def test_scheduler_preempts_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(4, "a"), seq(4, "b")
    sch.add(a)
    sch.add(b)
    for s in sch.schedule():
        s.seq.num_computed += s.num_tokens
        s.seq.output_ids.append(7)
    assert bm.num_free == 0
    batch = sch.schedule()  # both need a 3rd block; only b's can be taken
    assert [s.seq.request_id for s in batch] == ["a"]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed == 0
    assert list(sch.waiting) == [b] and b.metrics.num_preemptions == 1
    assert b.tokens == [2, 3, 4, 5, 7]  # recompute: prompt + generated so far
    sch.remove(a)
    batch = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in batch] == [("b", 5)]


def test_scheduler_respects_max_num_seqs():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sch.add(seq(2, str(i)))
    assert len(sch.schedule()) == 2 and len(sch.waiting) == 1


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    k = apply_top_k_top_p(logits.clone(), torch.tensor([2, 4]), None)
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all() and torch.isfinite(k[1]).all()
    p = apply_top_k_top_p(logits.clone(), None, torch.tensor([0.7, 1.0]))
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    tiny = apply_top_k_top_p(logits.clone(), None, torch.tensor([1e-9, 1e-9]))
    assert torch.isfinite(tiny).sum(-1).tolist() == [1, 1]  # the best token always survives


def test_sampler_distribution_and_seeds():
    sampler = Sampler()
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]])).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0).resolve()] * 4000
    ids, _ = sampler(logits, params, [None] * 4000)
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.03)
    topk = [SamplingParams(temperature=1.0, top_k=2).resolve()] * 4000
    assert set(sampler(logits, topk, [None] * 4000)[0]) == {0, 1}
    one = logits[:1]
    p = [SamplingParams(temperature=1.0, seed=5).resolve()]

    def draws(s):
        return [sampler(one, p, [g])[0][0] for g in [torch.Generator().manual_seed(s)] for _ in range(20)]

    assert draws(5) == draws(5) and draws(5) != draws(6)


def test_sampler_temperature_sharpens_to_softmax_of_logits_over_t_and_near_zero_is_greedy():
    """T=0.5 must follow softmax(logits / 0.5), not softmax(logits): 0.6/0.3/0.1 becomes 0.78/0.20/0.02."""
    sampler = Sampler()
    n = 8000
    torch.manual_seed(1234)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(n, 1)
    ids, _ = sampler(logits, [SamplingParams(temperature=0.5).resolve()] * n, [None] * n)
    freq = torch.bincount(torch.tensor(ids), minlength=3).float() / n
    expected = (logits[0] / 0.5).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.02), (freq, expected)  # binomial sd at n=8000: <= 0.006
    assert not torch.allclose(freq, logits[0].softmax(-1), atol=0.05)
    varied = torch.stack([torch.randperm(50).float() * 0.25 for _ in range(64)])  # top two 0.25 apart: e^-25 at T=0.01
    cold, _ = sampler(varied, [SamplingParams(temperature=0.01).resolve()] * 64, [None] * 64)
    assert cold == varied.argmax(-1).tolist()


def test_stop_string_holdback_in_stream():
    s = seq(2, stop=["END"])
    s.text = "abcEN"  # as if detokenized so far
    s._pending_ids = [9]
    ev = s.take_event()
    assert ev.text == "abc"  # "EN" might become "END": held back
    s.text += "Z"
    assert s.take_event().text == "E"
    s.text += "END and more"
    assert s._check_stop_strings() and s.text == "abcENZ" and s.finish_reason == "stop"
    last = s.take_event()
    assert last.text == "NZ" and last.finished
