import pytest
import torch

import services.inference_worker.kernels as K
from services.inference_worker.kernels.rope import rope_ref, rope_triton

from .utils import DTYPES, assert_close


def _cos_sin(T, head_dim, base=10000.0, seed=0):
    # Arbitrary, non-monotonic positions, as in a batch of decode steps.
    pos = torch.randperm(4 * T + 7, generator=torch.Generator().manual_seed(seed))[:T].float()
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, n_heads, head_dim",
    [(1, 1, 16), (5, 3, 16), (3, 4, 48), (7, 2, 64), (2, 5, 80), (4, 1, 2)],
)
def test_rope(T, n_heads, head_dim, dtype, device):
    x = torch.randn(T, n_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    cos, sin = (t.to(device) for t in _cos_sin(T, head_dim))
    x_before = x.clone()
    out = rope_triton(x, cos, sin)
    assert_close(out, rope_ref(x, cos, sin), dtype)
    assert torch.equal(x, x_before), "rope must not modify its input"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_fused_qkv_view(dtype, device):
    T, n_q, n_kv, d = 6, 4, 2, 32
    qkv = torch.randn(T, (n_q + 2 * n_kv) * d, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    q = qkv[:, : n_q * d].view(T, n_q, d)
    k = qkv[:, n_q * d : (n_q + n_kv) * d].view(T, n_kv, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = (t.to(device) for t in _cos_sin(T, d))
    for x in (q, k):
        assert_close(rope_triton(x, cos, sin), rope_ref(x, cos, sin), dtype)


def test_rope_on_head_major_view(device):
    # [H, T, d] storage seen as [T, H, d]: heads are further apart than tokens.
    T, H, d = 5, 3, 16
    x = torch.randn(H, T, d, generator=torch.Generator().manual_seed(3)).to(device).transpose(0, 1)
    assert x.stride(1) > x.stride(0)
    cos, sin = (t.to(device) for t in _cos_sin(T, d))
    assert_close(rope_triton(x, cos, sin), rope_ref(x, cos, sin), torch.float32)


def test_rope_ref_matches_hf_rotate_half():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, H, d = 5, 3, 16
    q, k = torch.randn(1, H, T, d), torch.randn(1, H, T, d)  # HF layout [B, H, T, d]
    cos, sin = _cos_sin(T, d)
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, full_cos, full_sin)
    ours = rope_ref(q[0].transpose(0, 1), cos, sin).transpose(0, 1)
    torch.testing.assert_close(ours, q_hf[0], atol=1e-6, rtol=1e-6)
    ours_k = rope_ref(k[0].transpose(0, 1), cos, sin).transpose(0, 1)
    torch.testing.assert_close(ours_k, k_hf[0], atol=1e-6, rtol=1e-6)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")

    monkeypatch.setattr(K, "rope_triton", boom)
    x = torch.randn(3, 2, 16)
    cos, sin = _cos_sin(3, 16)
    assert torch.equal(K.rope(x, cos, sin), rope_ref(x, cos, sin))


def test_bad_inputs_raise():
    cos, sin = _cos_sin(3, 16)
    with pytest.raises(ValueError, match="cos of shape"):
        rope_triton(torch.randn(3, 2, 16), cos[:, :4], sin)
    with pytest.raises(ValueError, match="sin of shape"):
        rope_triton(torch.randn(3, 2, 16), cos, sin[:2])
    with pytest.raises(ValueError, match="even head_dim"):
        rope_triton(torch.randn(3, 2, 15), cos, sin)
    with pytest.raises(ValueError, match=r"\[T, n_heads, head_dim\]"):
        rope_triton(torch.randn(3, 32), cos, sin)
