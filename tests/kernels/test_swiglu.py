import pytest
import torch
import torch.nn.functional as F

import services.inference_worker.kernels as K
from services.inference_worker.kernels.swiglu import swiglu_ref, swiglu_triton

from .utils import DTYPES, assert_close

# Last dims are 2 * I; I = 1500 spans two column blocks of the kernel.
SHAPES = [(1, 2), (3, 14), (2, 5, 200), (4, 514), (2, 2000), (1, 3000)]


def _input(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g)).to(dtype).to(device)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu(shape, dtype, activation, device):
    gu = _input(shape, dtype, device)
    out = swiglu_triton(gu, activation)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, swiglu_ref(gu, activation), dtype)


def test_geglu_ref_is_transformers_gelu_pytorch_tanh():
    from transformers.activations import ACT2FN

    gate, up = 3 * torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(swiglu_ref(torch.cat([gate, up], -1), "gelu_tanh"),
                               ACT2FN["gelu_pytorch_tanh"](gate) * up, atol=1e-6, rtol=1e-6)


def test_swiglu_strided_input(device):
    big = _input((4, 3, 40), torch.float32, device)
    gu = big[:, 1, 4:36]  # [4, 32], rows 120 elements apart
    assert not gu.is_contiguous()
    assert_close(swiglu_triton(gu), swiglu_ref(gu), torch.float32)


def test_swiglu_ref_is_gate_first():
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(swiglu_ref(torch.cat([gate, up], -1)), F.silu(gate) * up)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")

    monkeypatch.setattr(K, "swiglu_triton", boom)
    gu = _input((3, 14), torch.bfloat16, "cpu")
    assert torch.equal(K.swiglu(gu), swiglu_ref(gu))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 \\* I"):
        swiglu_triton(torch.randn(3, 7))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        swiglu_triton(torch.randn(3, 8), "relu")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        swiglu_ref(torch.randn(3, 8), "relu")
    with pytest.raises(ValueError, match="floating-point"):
        swiglu_triton(torch.ones(3, 8, dtype=torch.int64))
