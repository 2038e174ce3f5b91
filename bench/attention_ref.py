"""The CPU reference of paged decode attention, before and after it moved to one gather +
F.scaled_dot_product_attention, at the decode shapes of bench/engine.py (interleaved, same run), next
to F.scaled_dot_product_attention on an already-contiguous KV cache (no block table, no gather: the
floor a paged kernel is compared with). bench/engine.py's CUDA attention table uses the same helpers.

    .venv/bin/python bench/attention_ref.py [--batch 32] [--context 96]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.host import loadavg  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def einsum_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """The previous reference (two einsums, masked softmax, fp32), kept here as the baseline."""
    B, n_q, d = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    n_slots = block_tables.shape[1] * block_size
    blocks = block_tables.long().clamp(0, max(k_cache.shape[0] - 1, 0))
    k = k_cache[blocks].reshape(B, n_slots, n_kv, d).float()
    v = v_cache[blocks].reshape(B, n_slots, n_kv, d).float()
    qf = q.float().view(B, n_kv, n_q // n_kv, d)
    scores = torch.einsum("bhgd,bshd->bhgs", qf, k) * scale
    valid = torch.arange(n_slots, device=q.device)[None, :] < context_lens[:, None].long()
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgs,bshd->bhgd", probs, v).reshape(B, n_q, d).to(q.dtype)


def contiguous_kv(k_cache, v_cache, block_tables, length: int):
    """The paged cache copied out once into contiguous [B, n_kv, length, head_dim] K and V (slots past
    a sequence's context hold whatever the blocks held: mask them)."""
    B = block_tables.shape[0]
    _, block_size, n_kv, d = k_cache.shape
    n_blocks = -(-length // block_size)
    blocks = block_tables[:, :n_blocks].long()

    def one(cache):
        return (cache[blocks].reshape(B, n_blocks * block_size, n_kv, d)[:, :length]
                .transpose(1, 2).contiguous())

    return one(k_cache), one(v_cache)


def has_sdpa_gqa() -> bool:
    """F.scaled_dot_product_attention(enable_gqa=...) exists (torch >= 2.5)."""
    import inspect
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        try:
            x = torch.zeros(1, 2, 1, 4)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


def sdpa_contiguous(q, k, v, scale: float, mask=None):
    """Decode attention of q [B, n_q, D] over contiguous k, v [B, n_kv, L, D] (mask: [B, L] bool,
    True = attend, or None = attend to all L). GQA through enable_gqa, so K/V are read once; on an
    older torch the caller passes K/V already expanded to n_q heads."""
    B, n_q, d = q.shape
    kw = {"enable_gqa": True} if k.shape[1] != n_q else {}
    m = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=m, scale=scale, **kw)
    return out.reshape(B, n_q, d)


def length_mask(context_lens, length: int):
    return torch.arange(length, device=context_lens.device)[None, :] < context_lens[:, None].long()


def main() -> None:
    from services.inference_worker.kernels.paged_attention import paged_decode_attention_ref

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=96, help="tokens per sequence (prompt 32 + 64 new)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, bs = args.batch, args.block_size
    per_seq = -(-args.context // bs)
    k_cache = torch.randn(B * per_seq + 1, bs, args.kv_heads, args.head_dim)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.arange(B * per_seq, dtype=torch.int32).reshape(B, per_seq)
    context_lens = torch.full((B,), args.context, dtype=torch.int32)
    q = torch.randn(B, args.heads, args.head_dim)
    call = (q, k_cache, v_cache, block_tables, context_lens, args.head_dim ** -0.5)
    torch.testing.assert_close(paged_decode_attention_ref(*call), einsum_ref(*call), atol=1e-5, rtol=1e-5)
    k, v = contiguous_kv(k_cache, v_cache, block_tables, args.context)
    if not has_sdpa_gqa():  # torch < 2.5: K/V expanded to the query heads up front
        group = args.heads // args.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    contiguous = lambda *_: sdpa_contiguous(q, k, v, args.head_dim ** -0.5)  # noqa: E731
    torch.testing.assert_close(contiguous(), einsum_ref(*call), atol=1e-5, rtol=1e-5)
    fns = {"einsum (before)": einsum_ref, "gather + SDPA (now)": paged_decode_attention_ref,
           "SDPA, contiguous cache": contiguous}
    times = {name: [] for name in fns}
    for _ in range(args.iters):  # interleaved, so both see the same machine
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*call)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}
    print(f"paged_decode_attention_ref, batch {B}, context {args.context}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {loadavg()}")
    for name, us in med.items():
        print(f"  {name:<22} median {us:8.1f} us")
    before, now = med["einsum (before)"], med["gather + SDPA (now)"]
    print(f"  speed-up {before / now:.2f}x; now / contiguous-cache SDPA "
          f"{now / med['SDPA, contiguous cache']:.2f}x (the gather's cost)")


if __name__ == "__main__":
    main()
