import math

import pytest
import torch

import services.inference_worker.kernels as K
from services.inference_worker.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)

from .utils import ATTENTION_TOLERANCES, DTYPES, assert_close


def _make_case(n_q, n_kv, head_dim, page, lens, dtype, device, pad="neg1", seed=0, strided_q=False,
               window=None):
    """A ragged batch in a shuffled paged cache.

    Every slot that no sequence owns is NaN, so a kernel that reads past a context (the tail of
    a last, partly filled page) or follows a padding entry of the block table returns NaN.
    With a window, the tokens before each sequence's window are NaN too, and the table entries
    of blocks wholly before it point at the NaN block, as if the engine had freed them.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    per_seq = [math.ceil(n / page) for n in lens]
    width = max(per_seq) + 1  # always at least one padding entry per row
    num_blocks = sum(per_seq) + 3  # spare blocks, never referenced
    ids = torch.randperm(num_blocks, generator=g)  # non-contiguous, shuffled block order
    poison = int(ids[-1])  # a spare block: all NaN

    k_cache = torch.full((num_blocks, page, n_kv, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.full((B, width), -1 if pad == "neg1" else poison, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(lens):
        blocks = ids[nxt : nxt + per_seq[b]]
        nxt += per_seq[b]
        block_tables[b, : len(blocks)] = blocks.int()
        lo = 0 if window is None else max(n - window, 0)
        block_tables[b, : lo // page] = poison
        for t in range(lo, n):
            blk, slot = int(blocks[t // page]), t % page
            k_cache[blk, slot] = torch.randn(n_kv, head_dim, generator=g)
            v_cache[blk, slot] = torch.randn(n_kv, head_dim, generator=g)

    if strided_q:  # q sliced out of a fused qkv projection
        qkv = torch.randn(B, (n_q + 2 * n_kv) * head_dim, generator=g).to(device, dtype)
        q = qkv[:, : n_q * head_dim].view(B, n_q, head_dim)
    else:
        q = torch.randn(B, n_q, head_dim, generator=g).to(device, dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return q, k_cache.to(device, dtype), v_cache.to(device, dtype), block_tables.to(device), context_lens.to(device)


# (n_q, n_kv, head_dim, page, lens, partition_size)
CASES = {
    "mha-1tok": (2, 2, 16, 16, [1], 16),
    "gqa2-ragged": (4, 2, 32, 8, [5, 64, 77], 32),
    "gqa4-d64": (8, 2, 64, 16, [100, 33], 32),
    "gqa4-d48-page4": (4, 1, 48, 4, [13, 40], 16),
    "gqa2-d80": (6, 3, 80, 16, [50, 17, 3], 16),
    "qwen-gqa7": (14, 2, 64, 16, [21, 70], 32),
    "odd-page5": (2, 1, 16, 5, [9, 23], 16),
    "batch8-page-edges": (8, 2, 32, 16, [1, 2, 15, 16, 17, 64, 129, 200], 64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_decode_attention(case, dtype, device):
    n_q, n_kv, d, page, lens, part = CASES[case]
    args = _make_case(n_q, n_kv, d, page, lens, dtype, device, pad="neg1" if len(lens) % 2 else "poison")
    scale = d**-0.5
    out = paged_decode_attention_triton(*args, scale, partition_size=part)
    assert torch.isfinite(out).all(), "read a slot outside the context"
    assert_close(out, paged_decode_attention_ref(*args, scale), dtype, ATTENTION_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_partition_size_and_strided_q(dtype, device):
    # 300 tokens: two partitions of the default 256.
    args = _make_case(4, 2, 32, 16, [300, 7], dtype, device, strided_q=True)
    assert not args[0].is_contiguous()
    out = paged_decode_attention_triton(*args, 0.3)
    assert_close(out, paged_decode_attention_ref(*args, 0.3), dtype, ATTENTION_TOLERANCES)


def test_empty_context_gives_zeros(device):
    # A batch padded with an idle slot (context_len 0, e.g. for a fixed-size CUDA graph):
    # its output is zeros and it does not disturb its neighbours.
    args = _make_case(4, 2, 16, 8, [20, 0, 9], torch.float32, device)
    out = paged_decode_attention_triton(*args, 0.25, partition_size=16)
    ref = paged_decode_attention_ref(*args, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(ref[1], out[1])
    assert_close(out, ref, torch.float32, ATTENTION_TOLERANCES)


def _dense(q, kc, vc, bt, cl, scale, window=None, softcap=None):
    """The literal definition, one sequence at a time in fp64, reading only the positions the
    query sees: [max(n - window, 0), n)."""
    page, n_q, n_kv = kc.shape[1], q.shape[1], kc.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(cl.tolist()):
        pos = torch.arange(0 if window is None else max(n - window, 0), n)
        if not len(pos):
            continue
        blocks, slots = bt[b].cpu().long()[pos // page], pos % page
        k = kc.cpu()[blocks, slots].double().repeat_interleave(n_q // n_kv, dim=1)  # [n, n_q, d]
        v = vc.cpu()[blocks, slots].double().repeat_interleave(n_q // n_kv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].cpu().double(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out.to(q.device, q.dtype)


def test_ref_matches_per_sequence_softmax():
    """The vectorised reference against the literal definition."""
    n_q, n_kv, d, page, lens = 6, 2, 16, 4, [3, 9, 16, 1]
    args = _make_case(n_q, n_kv, d, page, lens, torch.float32, "cpu", pad="poison")
    out = paged_decode_attention_ref(*args, 0.25)
    torch.testing.assert_close(out, _dense(*args, 0.25), atol=1e-5, rtol=1e-5)


# (n_q, n_kv, head_dim, page, lens, window, partition_size)
WINDOW_CASES = {
    "w<ctx-gqa2": (4, 2, 32, 8, [5, 64, 77], 20, 32),
    "w=ctx": (4, 1, 16, 8, [37, 37], 37, 16),
    "w>ctx": (2, 2, 16, 16, [10, 30], 1000, 16),
    "w1-only-itself": (6, 3, 16, 4, [1, 9, 16], 1, 16),
    "w23-page16-odd": (8, 2, 64, 16, [100, 33, 17, 23, 24], 23, 32),
    "qwen-gqa7-page5": (14, 2, 48, 5, [21, 70, 4], 13, 16),
    # a long context under a short window: fewer partitions than the table's width needs
    "long-ctx-w40": (4, 2, 32, 16, [300, 7, 41], 40, 32),
    # the window straddles several partitions and starts mid-partition
    "w70-spans-parts": (4, 2, 32, 8, [200, 71, 69], 70, 32),
}


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_sliding_window_and_softcap(case, dtype, softcap, device):
    """Triton vs reference vs the dense definition. Everything before each window is NaN (and
    wholly-outside blocks point at a NaN block), so reading any of it shows."""
    n_q, n_kv, d, page, lens, window, part = WINDOW_CASES[case]
    args = _make_case(n_q, n_kv, d, page, lens, dtype, device, window=window,
                      pad="neg1" if len(lens) % 2 else "poison")
    scale = d**-0.5
    out = paged_decode_attention_triton(*args, scale, window=window, softcap=softcap, partition_size=part)
    assert torch.isfinite(out).all(), "read a slot outside the window or the context"
    ref = paged_decode_attention_ref(*args, scale, window=window, softcap=softcap)
    assert torch.isfinite(ref).all()
    assert_close(out, ref, dtype, ATTENTION_TOLERANCES)
    assert_close(ref, _dense(*args, scale, window, softcap), dtype, ATTENTION_TOLERANCES)


def test_softcap_without_window_and_large_scores(device):
    # scores far beyond the cap: exercises the tanh's saturation (no inf/NaN from exp overflow)
    args = _make_case(4, 2, 32, 8, [50, 3], torch.float32, device)
    out = paged_decode_attention_triton(*args, 30.0, softcap=5.0, partition_size=16)
    ref = paged_decode_attention_ref(*args, 30.0, softcap=5.0)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, ATTENTION_TOLERANCES)
    assert_close(ref, _dense(*args, 30.0, softcap=5.0), torch.float32, ATTENTION_TOLERANCES)
    assert not torch.allclose(ref, paged_decode_attention_ref(*args, 30.0), atol=1e-2)  # it mattered


def test_window_at_or_beyond_the_context_changes_nothing(device):
    args = _make_case(4, 2, 16, 8, [20, 9], torch.float32, device)
    plain = paged_decode_attention_triton(*args, 0.25, partition_size=16)
    for window in (20, 21, 10**9):
        assert torch.equal(paged_decode_attention_triton(*args, 0.25, window=window, partition_size=16), plain)
    assert torch.equal(paged_decode_attention_ref(*args, 0.25, window=20), paged_decode_attention_ref(*args, 0.25))


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")

    monkeypatch.setattr(K, "paged_decode_attention_triton", boom)
    args = _make_case(4, 2, 16, 8, [5, 20], torch.float32, "cpu")
    assert torch.equal(K.paged_decode_attention(*args, 0.25), paged_decode_attention_ref(*args, 0.25))
    assert torch.equal(K.paged_decode_attention(*args, 0.25, window=6, softcap=3.0),
                       paged_decode_attention_ref(*args, 0.25, window=6, softcap=3.0))


def test_bad_inputs_raise():
    q, kc, vc, bt, cl = _make_case(4, 2, 16, 8, [5, 20], torch.float32, "cpu")
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention_triton(q, kc, vc, bt.long(), cl, 0.25)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention_triton(q, kc, vc, bt[:1], cl, 0.25)
    with pytest.raises(ValueError, match="context_lens must be int32"):
        paged_decode_attention_triton(q, kc, vc, bt, cl.long(), 0.25)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        paged_decode_attention_triton(q[..., :8], kc, vc, bt, cl, 0.25)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        paged_decode_attention_triton(q[:, :3], kc, vc, bt, cl, 0.25)
    with pytest.raises(ValueError, match="v_cache shape"):
        paged_decode_attention_triton(q, kc, vc[:, :4], bt, cl, 0.25)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention_triton(q, kc, vc, bt, cl, 0.25, partition_size=48)
    with pytest.raises(ValueError, match="q must be"):
        paged_decode_attention_triton(q[0], kc, vc, bt, cl, 0.25)
    for fn in (paged_decode_attention_triton, paged_decode_attention_ref):
        for window in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="window must be"):
                fn(q, kc, vc, bt, cl, 0.25, window=window)
        with pytest.raises(ValueError, match="softcap must be"):
            fn(q, kc, vc, bt, cl, 0.25, softcap=0.0)
