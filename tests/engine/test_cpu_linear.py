"""16-bit linears prepacked for oneDNN (bf16) and fbgemm (fp16) (engine/cpu_linear.py): the product against the
fp32 reference over odd shapes, and an engine loaded with packing against the same engine without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import services.inference_worker.engine.cpu_linear as cpu_linear
from services.inference_worker.kernels import cpu_gemv
from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import PROMPTS


def needs_pack(dtype):
    return pytest.mark.skipif(
        not cpu_linear.can_pack(dtype),
        reason=f"no prepacked {dtype} GEMM here "
        "(bf16: oneDNN with avx512_bf16 or AMX; fp16: a torch built with fbgemm)",
    )


@pytest.mark.parametrize("dtype", [pytest.param(dt, marks=needs_pack(dt)) for dt in (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("n, k", [(1, 7), (17, 33), (96, 64), (250, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_the_fp32_reference(dtype, rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    linear = nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    linear.weight.copy_(torch.randn(n, k, generator=g))
    if bias:
        linear.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, k, generator=g).to(dtype)
    out = cpu_linear.PackedLinear(linear)(x)
    ref = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    assert out.shape == (rows, n) and out.dtype == dtype
    # the only rounding is the 16-bit output (bf16: 8 bits of mantissa, fp16: 11)
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_pack(torch.bfloat16)
def test_only_16_bit_cpu_projections_are_packed():
    model = nn.ModuleDict({"qkv": nn.Linear(8, 24), "router": nn.Linear(8, 4), "down": nn.Linear(8, 8)}).bfloat16()
    model["o"] = nn.Linear(8, 8)  # fp32
    assert cpu_linear.pack_model(model) == 2  # qkv and down; o is fp32, the router is not a projection
    assert isinstance(model["qkv"], cpu_linear.PackedLinear) and isinstance(model["down"], cpu_linear.PackedLinear)
    assert type(model["o"]) is nn.Linear and type(model["router"]) is nn.Linear


def test_without_a_prepacked_gemm_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(cpu_linear, "can_pack", lambda dtype: False)
    model = nn.ModuleDict({"qkv": nn.Linear(8, 24)}).bfloat16()
    assert cpu_linear.pack_model(model) == 0 and type(model["qkv"]) is nn.Linear


@pytest.mark.parametrize("dtype", [pytest.param(dt, marks=needs_pack(dt)) for dt in (torch.bfloat16, torch.float16)])
def test_packed_engine_agrees_with_the_plain_engine(dtype, ckpts, monkeypatch):
    cfg = EngineConfig(device="cpu", dtype=dtype, num_blocks=64)
    packed = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    monkeypatch.setattr(cpu_linear, "can_pack", lambda dtype: False)
    plain = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    kinds = {type(m).__name__ for m in packed.ckpt.model.modules()}
    assert "PackedLinear" in kinds and "Linear" not in kinds  # the head too: this checkpoint is untied
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in plain.ckpt.model.modules())
    assert packed.weights_bytes == plain.weights_bytes  # same bytes, other order: fit's booking holds

    ids = torch.tensor(packed.tokenizer.encode(PROMPTS[1]))
    a, b = packed.ckpt.model.logits_without_cache(ids), plain.ckpt.model.logits_without_cache(ids)
    err = (a - b).abs().max().item()
    assert err < 0.05 * b.std().item(), f"packed vs plain {dtype} logits differ by {err}"
    params = SamplingParams(max_tokens=8, temperature=0)
    same = sum(
        x.token_ids == y.token_ids for x, y in zip(packed.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    )
    assert same >= len(PROMPTS) - 1  # bf16 accumulation order may flip one near-tie


@pytest.mark.skipif(cpu_gemv.unavailable() is not None, reason=f"cpu_gemv does not run here: {cpu_gemv.unavailable()}")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decode_runs_our_loop_and_agrees_with_torchs_kernels(quantize, ckpts, monkeypatch):
    """bf16 and int8 decode steps through kernels/cpu_gemv.py, against the same engine with
    STRATA_CPU_GEMV=off (oneDNN's bf16 layout; torch's int8 kernel): the same greedy tokens but for a
    near-tie, since only the order of fp32 additions differs."""
    cfg = EngineConfig(device="cpu", dtype=torch.bfloat16, quantize=quantize, num_blocks=64)
    ours = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    monkeypatch.setenv("STRATA_CPU_GEMV", "off")
    torchs = LLMEngine.from_pretrained(ckpts("llama").path, cfg)
    monkeypatch.delenv("STRATA_CPU_GEMV")
    qkv = ours.ckpt.model.layers[0].attn.qkv
    assert qkv.gemv and not torchs.ckpt.model.layers[0].attn.qkv.gemv
    assert ours.weights_bytes == torchs.weights_bytes

    calls = {"n": 0}
    name = "_gemv_int8" if quantize else "_gemv_bf16"
    real = getattr(cpu_gemv, name)

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(cpu_gemv, name, counted)
    params = SamplingParams(max_tokens=8, temperature=0)
    mine = ours.generate(PROMPTS, params)
    assert calls["n"] > 0
    monkeypatch.setattr(cpu_gemv, name, real)
    same = sum(x.token_ids == y.token_ids for x, y in zip(mine, torchs.generate(PROMPTS, params)))
    assert same >= len(PROMPTS) - 1
