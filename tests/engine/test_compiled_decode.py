"""The compiled decode step (engine/compiled_decode.py, EngineConfig.compile_decode).

Its attention reads the cache without the current token and joins that token's k and v as one more
column; the first test pins that math to the paged reference the eager engine runs, over the cases that
differ (GQA, windows, soft-caps, NaN in unused slots), without compiling anything. The others compile
(inductor, ~20–40 s each on a 2-core machine): a model-level comparison with eager on a family with
windows, soft-caps and sandwich norms in bf16, and an engine run in fp32 whose greedy tokens must equal
the eager engine's with no compile after load.
"""
from __future__ import annotations

import pytest
import torch

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.inference_worker.engine.compiled_decode import CompiledDecode, attend_appended, decode_plans
from services.inference_worker.engine.loader import load_checkpoint
from services.inference_worker.engine.model import AttentionMetadata
from services.inference_worker.kernels import paged_decode_attention_ref


def _decode_batch(B, n_kv, d, block_size, num_blocks, width, dtype, g):
    """A random cache (NaN in every slot no sequence owns), distinct blocks per sequence, and contexts of
    every length from 1 to the table's capacity."""
    cache = torch.full((2, num_blocks, block_size, n_kv, d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks - 1, generator=g)[: B * width] + 1
    tables = perm.view(B, width).to(torch.int32)
    ctx = torch.randint(1, width * block_size + 1, (B,), generator=g, dtype=torch.int32)
    ctx[0] = 1
    for b in range(B):
        for p in range(int(ctx[b]) - 1):  # the tokens before the current one
            blk, off = tables[b, p // block_size], p % block_size
            cache[:, blk, off] = torch.randn(2, n_kv, d, generator=g).to(dtype)
    slots = torch.stack([tables[b, (c - 1) // block_size].long() * block_size + (c - 1) % block_size
                         for b, c in enumerate(ctx.tolist())])
    return cache, tables, ctx, slots


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_with_the_current_token_appended_equals_the_paged_reference(window, softcap, dtype):
    g = torch.Generator().manual_seed(0)
    B, n_q, n_kv, d, block_size = 5, 6, 2, 8, 4
    cache, tables, ctx, slots = _decode_batch(B, n_kv, d, block_size, num_blocks=40, width=6, dtype=dtype, g=g)
    q = torch.randn(B, n_q, d, generator=g).to(dtype)
    k, v = torch.randn(2, B, n_kv, d, generator=g).to(dtype)
    plan = decode_plans(tables, ctx, {window}, block_size, cache.shape[1])[window]
    got = attend_appended(q, k, v, cache, plan, 0.3, softcap)

    written = cache.clone()  # the eager path: write the token, then attend over the cache
    written[0].view(-1, n_kv, d)[slots] = k
    written[1].view(-1, n_kv, d)[slots] = v
    want = paged_decode_attention_ref(q, written[0], written[1], tables, ctx, 0.3, window=window, softcap=softcap)
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the same fp32 math, one rounding of the output
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_the_compiled_step_matches_eager_on_windows_softcaps_and_sandwich_norms(ckpts):
    """gemma2: local and global layers, attention and final soft-caps, norms before and after, in bf16."""
    torch.manual_seed(0)
    model = load_checkpoint(ckpts("gemma2").path, device="cpu", dtype="bfloat16").model
    cfg, block_size = model.cfg, 4
    g = torch.Generator().manual_seed(1)
    B, width = 3, 10  # a context up to 40 tokens: past the 24-token window
    layers = torch.full((cfg.num_layers, 2, 64, block_size, cfg.num_kv_heads, cfg.head_dim), 0.0,
                        dtype=torch.bfloat16)
    tables = (torch.randperm(63, generator=g)[: B * width] + 1).view(B, width).to(torch.int32)
    ctx = torch.tensor([1, 23, 37], dtype=torch.int32)
    layers[:, :, 1:] = torch.randn(layers[:, :, 1:].shape, generator=g).to(torch.bfloat16)
    pos = (ctx - 1).long()
    slots = torch.stack([tables[b, p // block_size].long() * block_size + p % block_size
                         for b, p in enumerate(pos.tolist())])
    ids = torch.randint(0, cfg.vocab_size, (B,), generator=g)
    model.init_rope(64)
    with torch.inference_mode():
        eager_kv = layers.clone()
        meta = AttentionMetadata(slot_mapping=slots, num_decode=B, block_tables=tables, context_lens=ctx)
        want = model.compute_logits(model(ids, pos, meta, eager_kv))
        compiled_kv = layers.clone()
        got = model.compute_logits(CompiledDecode(model, block_size)(ids, pos, tables, ctx, slots, compiled_kv))
    # With emulate_precision_casts the compiled step rounds where eager does: on this 2-core AVX-512 VM it
    # was bit-exact (max difference 0.0). Only the order of fp32 sums may differ with another CPU's
    # vector width, hence a tolerance of a fiftieth of the logits' spread and one bf16 step of the cache.
    std = want.std().item()
    assert (got - want).abs().max().item() <= 0.02 * std, (got - want).abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    torch.testing.assert_close(compiled_kv.float(), eager_kv.float(), atol=1 / 64, rtol=1 / 128)


def test_an_engine_with_compile_decode_gives_eagers_greedy_tokens_and_compiles_only_at_load(ckpts):
    from torch._dynamo.utils import counters

    path = ckpts("llama").path
    config = dict(device="cpu", dtype="float32", num_blocks=96, block_size=4)
    # six requests ending at different steps: decode batches of 6 and 5 rows (eager: over MAX_ROWS), then
    # 4, 3, 2 and 1 (compiled), all over one cache; the longest prompt needs a 13-column block table
    prompts = [list(range(3, 10)), list(range(20, 33)), [5], list(range(40, 90)), [7, 8], list(range(100, 120))]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 16, 12, 9, 6, 3)]
    assert len(prompts) > CompiledDecode.MAX_ROWS
    eager = [r.token_ids for r in LLMEngine.from_pretrained(path, EngineConfig(**config)).generate(prompts, params)]

    engine = LLMEngine.from_pretrained(path, EngineConfig(**config, compile_decode="on"))
    assert engine.runner.decode_graph.compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # batch 1 and batch >= 2, compiled by the load
    compiled = [r.token_ids for r in engine.generate(prompts, params)]
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step compiled after load"
    assert compiled == eager
    # after the prefill, request i decodes max_tokens - 1 = 19, 15, 11, 8, 5, 2 steps: steps 1–2 have 6 rows
    # and 3–5 have 5 (eager), steps 6–19 have 4 down to 1 (compiled)
    assert engine.runner.decode_graph.steps == 14


def test_compile_decode_refuses_moe_with_a_reason(ckpts):
    with pytest.raises(ValueError, match="MoE"):
        LLMEngine.from_pretrained(ckpts("mixtral").path, EngineConfig(device="cpu", dtype="float32",
                                                                     num_blocks=16, compile_decode="on"))


def test_compile_decode_auto_runs_moe_eager_and_a_bad_value_is_refused(ckpts):
    engine = LLMEngine.from_pretrained(ckpts("mixtral").path, EngineConfig(device="cpu", dtype="float32",
                                                                           num_blocks=16, compile_decode="auto"))
    assert engine.runner.decode_graph is None
    assert len(engine.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3
    with pytest.raises(ValueError, match="off, on or auto"):
        EngineConfig(compile_decode="yes")


def test_many_compiled_deployments_stay_under_torchs_recompile_limit(ckpts):
    """All instances' graphs hang off one code object: past the limit a deployment would decode uncompiled."""
    model = load_checkpoint(ckpts("llama").path, device="cpu", dtype="float32").model
    for _ in range(6):
        CompiledDecode(model, 4)
    assert torch._dynamo.config.recompile_limit >= 2 * CompiledDecode.instances
