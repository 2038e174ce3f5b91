import importlib

import pytest
import torch

import services.inference_worker.kernels as K
from services.inference_worker.kernels.rms_norm import (
    rms_norm_ref,
    rms_norm_residual_ref,
    rms_norm_residual_triton,
    rms_norm_triton,
)

from .utils import DTYPES, assert_close

# The package's `rms_norm` attribute is the dispatcher function, not this module.
rms_norm_mod = importlib.import_module("services.inference_worker.kernels.rms_norm")

SHAPES = [(1, 1), (3, 7), (5, 100), (2, 3, 257), (4, 1000)]
EPS = 1e-6


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype).to(device)
    return x, w


def test_kernels_run_here(device):
    """Without CUDA the kernels must really run, in the interpreter, on CPU tensors."""
    if device == "cpu":
        assert type(rms_norm_mod._rms_norm_kernel).__name__ == "InterpretedFunction"
    x, w = _inputs((2, 8), torch.float32, device)
    y = rms_norm_triton(x, w, EPS)
    assert y.device == x.device
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    assert_close(y, rms_norm_ref(x, w, EPS), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    assert_close(rms_norm_triton(x, w, EPS), rms_norm_ref(x, w, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_residual(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    res = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    x_before, res_before = x.clone(), res.clone()
    y, new_res = rms_norm_residual_triton(x, res, w, EPS)
    y_ref, new_res_ref = rms_norm_residual_ref(x, res, w, EPS)
    assert_close(new_res, new_res_ref, dtype)
    if dtype != torch.bfloat16:
        # One rounding of x + residual, as in torch, so it agrees exactly. (bf16 would too on
        # a GPU, but the interpreter truncates fp32 -> bf16 instead of rounding.)
        assert torch.equal(new_res, new_res_ref)
    assert_close(y, y_ref, dtype)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


def test_rms_norm_strided_rows(device):
    # A column slice: rows are not adjacent in memory.
    big = torch.randn(6, 300, generator=torch.Generator().manual_seed(2)).to(device)
    x = big[:, 17:117]
    w = torch.randn(100, generator=torch.Generator().manual_seed(3)).to(device)
    assert not x.is_contiguous()
    assert_close(rms_norm_triton(x, w, EPS), rms_norm_ref(x, w, EPS), torch.float32)


def test_rms_norm_ref_matches_hf():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    for dtype in DTYPES:
        x, w = _inputs((3, 64), dtype, "cpu")
        norm = modeling_llama.LlamaRMSNorm(64, eps=EPS).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            assert torch.equal(rms_norm_ref(x, w, EPS), norm(x))


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")

    monkeypatch.setattr(K, "rms_norm_triton", boom)
    monkeypatch.setattr(K, "rms_norm_residual_triton", boom)
    x, w = _inputs((3, 7), torch.float32, "cpu")
    res = torch.randn(3, 7)
    assert not K.use_triton(x)
    assert torch.equal(K.rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
    y, r = K.rms_norm_residual(x, res, w, EPS)
    y_ref, r_ref = rms_norm_residual_ref(x, res, w, EPS)
    assert torch.equal(y, y_ref) and torch.equal(r, r_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatcher_uses_triton_on_cuda():
    x = torch.randn(2, 8, device="cuda")
    assert K.use_triton(x)


def test_bad_inputs_raise():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.randn(7), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm_residual_triton(x, torch.randn(3, 9), torch.randn(8), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm_residual_triton(x, torch.randn(3, 8).half(), torch.randn(8), EPS)
    with pytest.raises(ValueError, match="floating-point"):
        rms_norm_triton(torch.ones(3, 8, dtype=torch.int32), torch.randn(8), EPS)
