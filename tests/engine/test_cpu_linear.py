"""bf16 linears prepacked for oneDNN (engine/cpu_linear.py): the product against the fp32 reference
over odd shapes, and an engine loaded with packing against the same engine without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import services.inference_worker.engine.cpu_linear as cpu_linear
from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import PROMPTS

needs_pack = pytest.mark.skipif(not cpu_linear.can_pack(),
                                reason="this CPU or torch build has no oneDNN bf16 path (avx512_bf16/AMX)")


@needs_pack
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("n, k", [(1, 7), (17, 33), (96, 64), (250, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_the_fp32_reference(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, k, generator=g).bfloat16()
    out = cpu_linear.packed_linear(x, cpu_linear.pack_weight(w), b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    # the only rounding is the bf16 output (8 bits of mantissa): relative error about 2^-8
    assert torch.allclose(out.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


@needs_pack
def test_only_bf16_cpu_linears_are_packed():
    model = nn.ModuleDict({"qkv": nn.Linear(8, 24), "o": nn.Linear(8, 8).half(), "router": nn.Linear(8, 4),
                           "down": nn.Linear(8, 8)}).bfloat16()
    model["o"] = nn.Linear(8, 8).half()
    assert cpu_linear.pack_model(model) == 2  # qkv and down; o is fp16, the router is not a projection
    assert isinstance(model["qkv"], cpu_linear.PackedLinear) and isinstance(model["down"], cpu_linear.PackedLinear)
    assert type(model["o"]) is nn.Linear and type(model["router"]) is nn.Linear


def test_without_onednn_bf16_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(cpu_linear, "can_pack", lambda: False)
    model = nn.ModuleDict({"qkv": nn.Linear(8, 24)}).bfloat16()
    assert cpu_linear.pack_model(model) == 0 and type(model["qkv"]) is nn.Linear


@needs_pack
def test_packed_engine_agrees_with_the_plain_bf16_engine(ckpts, monkeypatch):
    cfg = EngineConfig(device="cpu", dtype="bfloat16", num_blocks=64)
    packed = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    monkeypatch.setattr(cpu_linear, "can_pack", lambda: False)
    plain = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    kinds = {type(m).__name__ for m in packed.ckpt.model.modules()}
    assert "PackedLinear" in kinds and "Linear" not in kinds  # the head too: this checkpoint is untied
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in plain.ckpt.model.modules())
    assert packed.weights_bytes == plain.weights_bytes  # same bytes, other order: fit's booking holds

    ids = torch.tensor(packed.tokenizer.encode(PROMPTS[1]))
    a, b = packed.ckpt.model.logits_without_cache(ids), plain.ckpt.model.logits_without_cache(ids)
    err = (a - b).abs().max().item()
    assert err < 0.05 * b.std().item(), f"packed vs plain bf16 logits differ by {err}"
    params = SamplingParams(max_tokens=8, temperature=0)
    same = sum(x.token_ids == y.token_ids for x, y in zip(packed.generate(PROMPTS, params),
                                                         plain.generate(PROMPTS, params)))
    assert same >= len(PROMPTS) - 1  # bf16 accumulation order may flip one near-tie
