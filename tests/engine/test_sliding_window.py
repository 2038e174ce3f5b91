"""Sliding-window attention over the paged cache: blocks that left every layer's window are freed
(their table entries become the null block), so a windowed sequence can outgrow the cache; and the
tokens still equal transformers'."""
from __future__ import annotations

import pytest
import torch

from services.inference_worker import kernels
from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.inference_worker.engine.block_manager import NULL_BLOCK, BlockManager, freeing_window
from services.inference_worker.engine.scheduler import Scheduler

from .conftest import PROMPTS, build_checkpoint, hf_greedy
from .test_units import seq


def run_to_end(sch: Scheduler, seqs, max_steps: int = 500) -> list[int]:
    """Drive the scheduler as the engine does, checking after each schedule that every token a
    scheduled query may see is in a live block, no block is owned twice, the null block is never
    owned or free, and owned + free is the whole cache. Returns the used blocks after each step."""
    bm, w = sch.bm, sch.bm.window
    for s in seqs:
        sch.add(s)
    used = []
    for _ in range(max_steps):
        if not (sch.waiting or sch.running):
            return used
        batch = sch.schedule()
        owned = [b for s in sch.running for b in s.block_table if b != NULL_BLOCK]
        assert len(owned) == len(set(owned)) and NULL_BLOCK not in bm.free_ids
        assert sorted(owned + list(bm.free_ids)) == list(range(1, bm.num_blocks + 1))
        for s in batch:
            first = 0 if w is None else max(s.seq.num_computed - w + 1, 0)
            for pos in range(first, s.seq.num_computed + s.num_tokens):
                assert s.seq.block_table[pos // bm.block_size] != NULL_BLOCK, (s.seq.request_id, pos)
        for s in batch:
            samples = s.samples
            s.seq.num_computed += s.num_tokens
            if samples:
                s.seq.output_ids.append(7)
                if len(s.seq.output_ids) >= s.seq.params.max_tokens:
                    s.seq.finish("length")
                    sch.remove(s.seq)
        used.append(bm.usage().used_blocks)
    raise AssertionError("did not finish")


def test_freeing_window_needs_every_layer_windowed():
    assert freeing_window([24, 24]) == 24 and freeing_window([8, 32]) == 32
    assert freeing_window([4096, None, 4096]) is None  # Gemma-style global layers keep everything
    assert freeing_window([]) is None and freeing_window([None]) is None


def test_frees_exactly_the_blocks_before_every_future_query():
    bs, w = 4, 10
    for n in range(0, 60):
        bm = BlockManager(num_blocks=16, block_size=bs, window=w)
        s = seq(60)
        bm.ensure(s, 60)
        s.num_computed = n
        bm.free_outside_window(s)
        # block i is dead when its last position is before the first one query n can see
        want = [(i + 1) * bs - 1 < n - w + 1 for i in range(15)]
        assert [b == NULL_BLOCK for b in s.block_table] == want, n
        assert bm.num_free == 1 + sum(want)
        assert bm.free_outside_window(s) == 0  # idempotent


def test_null_block_never_handed_out_and_free_skips_it():
    bm = BlockManager(num_blocks=8, block_size=2, bytes_per_block=10, window=4)
    s = seq(10)
    assert bm.ensure(s, 10) and s.block_table == [1, 2, 3, 4, 5]
    s.num_computed = 9  # the next query (position 9) sees 6..9: blocks 0-2 are dead
    assert bm.free_outside_window(s) == 3 and s.block_table == [0, 0, 0, 4, 5]
    u = bm.usage()
    assert (u.num_blocks, u.used_blocks, u.free_blocks, u.total_bytes) == (8, 2, 6, 90)
    bm.free(s)
    assert s.block_table == [] and sorted(bm.free_ids) == list(range(1, 9))
    other = seq(16)
    assert bm.ensure(other, 16) and NULL_BLOCK not in other.block_table
    assert not bm.ensure(seq(1), 1)  # 8 usable blocks, all taken: block 0 is no capacity


def test_windowed_sequence_longer_than_the_cache_runs():
    # 6 blocks x 4 = 24 tokens of cache; the sequence is 40 + 12 = 52 tokens
    bm = BlockManager(num_blocks=6, block_size=4, window=8)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    assert sch.reserve_tokens(52) == 8 - 1 + 8 + 4 and sch.reserve_tokens(10) == 10
    s = seq(40, max_tokens=12)
    used = run_to_end(sch, [s])
    assert s.finished and len(s.output_ids) == 12 and sch.num_preemptions == 0
    assert max(used) <= 5  # ceil((8 - 1 + 8) / 4) + 1: the window behind a chunk
    assert used[-2] <= 3 and used[-1] == 0  # decoding holds ceil(8 / 4) + 1; the end frees it all


def test_usage_drops_as_the_window_slides():
    bm = BlockManager(num_blocks=32, block_size=4, window=8)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    s = seq(60, max_tokens=8)
    sch.add(s)
    for b in sch.schedule():
        b.seq.num_computed += b.num_tokens
        b.seq.output_ids.append(7)
    assert bm.usage().used_blocks == 15  # the whole prompt, in one step
    sch.schedule()  # the first decode (query 60, sees 53..60) frees blocks 0-12
    assert bm.usage().used_blocks == 3 and s.block_table[:13] == [NULL_BLOCK] * 13


def test_preemption_with_freed_entries_returns_only_real_blocks(monkeypatch):
    bm = BlockManager(num_blocks=5, block_size=4, window=3)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    freed_tables = []
    real_free = bm.free
    monkeypatch.setattr(bm, "free", lambda s: freed_tables.append(list(s.block_table)) or real_free(s))
    seqs = [seq(9, "a", max_tokens=10), seq(5, "b", max_tokens=10), seq(7, "c", max_tokens=10)]
    run_to_end(sch, seqs)  # checks the invariants each step
    assert sch.num_preemptions > 0 and any(s.metrics.num_preemptions for s in seqs)
    assert any(NULL_BLOCK in t for t in freed_tables[:sch.num_preemptions])  # a victim had freed entries
    assert all(s.finished and len(s.output_ids) == 10 for s in seqs)
    assert sorted(bm.free_ids) == list(range(1, 6))


def test_without_a_window_nothing_is_freed():
    bm = BlockManager(num_blocks=32, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    assert sch.reserve_tokens(100) == 100
    s = seq(30, max_tokens=4)
    sch.add(s)
    sch.schedule()
    s.num_computed = 30
    assert bm.free_outside_window(s) == 0 and NULL_BLOCK not in s.block_table
    used = run_to_end(Scheduler(BlockManager(8, 4), 4, 64), [seq(20, max_tokens=6)])
    assert used == [5, 6, 6, 6, 6, 0]  # the prompt, then a block per 4 tokens, all freed at the end


def test_non_windowed_engines_keep_their_caps(ckpts):
    llama = LLMEngine.from_pretrained(ckpts("llama").path, EngineConfig(device="cpu", num_blocks=8))
    assert llama.block_manager.window is None and llama.max_model_len == 8 * 16
    assert llama.runner.kv_cache.shape[2] == 8 + 1  # the null block
    assert llama.cache_usage().num_blocks == 8


# ---- end to end against transformers -------------------------------------------------------
WINDOW = 24


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("mistral-window"), tokenizer_dir, arch="mistral",
                            seed=11, sliding_window=WINDOW)


def long_prompt(eng) -> list[int]:
    ids = eng.tokenizer.encode(" ".join(PROMPTS))[:3 * WINDOW]
    assert len(ids) == 3 * WINDOW
    return ids


@pytest.mark.parametrize("ecfg", [
    # cache of 64 tokens < 72 + 32; 16-token chunks attend to a partly freed prefix
    dict(num_blocks=8, max_num_batched_tokens=16),
    dict(num_blocks=16, max_num_batched_tokens=256),  # the prompt in one step
], ids=["chunked-cache-smaller-than-sequence", "one-shot-prefill"])
def test_greedy_and_logits_equal_transformers(windowed, ecfg):
    eng = LLMEngine.from_pretrained(windowed.path, EngineConfig(device="cpu", dtype="float32",
                                                                block_size=8, **ecfg))
    assert eng.block_manager.window == WINDOW
    prompt = long_prompt(eng)
    peak = []
    rid = eng.add_request(prompt, SamplingParams(max_tokens=32, temperature=0, logprobs=windowed.vocab),
                          callback=lambda ev: peak.append(eng.cache_usage().used_blocks))
    out = []
    while eng.has_unfinished():
        out += eng.step()
    (out,) = [o for o in out if o.request_id == rid]
    assert out.finish_reason == "length" and len(out.token_ids) == 32
    assert out.token_ids == hf_greedy(windowed.hf, prompt, 32)
    # every step's distribution equals transformers' full forward over the whole sequence
    full = prompt + out.token_ids
    with torch.no_grad():
        hf = windowed.hf(torch.tensor([full])).logits[0].float().log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        ids, vals = zip(*lp.top)
        dense = torch.full((windowed.vocab,), float("nan"))
        dense[list(ids)] = torch.tensor(vals)
        torch.testing.assert_close(dense, hf[len(prompt) - 1 + i], atol=1e-4, rtol=0)
    # decoding holds the window and the current block, not the sequence
    assert max(peak[1:]) <= -(-WINDOW // 8) + 1
    assert eng.cache_usage().used_blocks == 0


def test_window_matters(windowed):
    """The checkpoint is one where the window changes the output, so the test above means
    something: the same weights without a window generate differently."""
    prompt = long_prompt(LLMEngine.from_pretrained(windowed.path, EngineConfig(device="cpu", num_blocks=16)))
    with_window = hf_greedy(windowed.hf, prompt, 32)
    windowed.hf.config.sliding_window = None  # read at each forward
    try:
        assert hf_greedy(windowed.hf, prompt, 32) != with_window
    finally:
        windowed.hf.config.sliding_window = WINDOW


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_decode_over_freed_blocks_equals_reference(windowed, monkeypatch):
    """The Triton kernels (interpreted here) over block tables whose early entries are the null
    block give the reference's tokens and logprobs."""
    eng = LLMEngine.from_pretrained(windowed.path, EngineConfig(device="cpu", dtype="float32", block_size=8,
                                                                num_blocks=8, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    prompt = long_prompt(eng)
    ref = eng.generate([prompt], params)[0]
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    tri = eng.generate([prompt], params)[0]
    assert tri.token_ids == ref.token_ids
    for x, y in zip(tri.logprobs, ref.logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
