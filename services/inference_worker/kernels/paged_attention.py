"""Paged decode attention: one new query token per sequence, K/V read through a block table.

Flash-decoding in two kernels:
1. ``_partition_kernel``, grid (batch, kv_head, partition): each program walks one slice of
   the context with an online softmax and writes an unnormalised partial output together
   with its running max and sum. One program serves every query head of a GQA group, so each
   K/V element is read from memory once per group, not once per query head.
2. ``_reduce_kernel``, grid (batch, q_head): rescales the partials to a common max and
   normalises.

Splitting the context keeps the GPU busy at small batch with long contexts, where one
program per (sequence, head) would leave most SMs idle.

The number of partitions comes from the block table's width (or the window, when that is
smaller), not from the longest context, so the launch needs no device-to-host sync; partitions
past a sequence's end do nothing.

Sliding windows (``window``) and Gemma-2-style logit soft-capping (``softcap``) follow Hugging Face
transformers: the query at position p = context_len - 1 sees key positions j with p - j < window,
and its scores are ``softcap * tanh(q.k * scale / softcap)`` before the softmax. Key positions
before the window are never read, nor are their block-table entries: the engine may have freed
those blocks (see engine/block_manager.py).
"""

from __future__ import annotations

import torch

from ._compat import HAS_TRITON, check_device, jit, tl, triton, tmax, tsum

DEFAULT_PARTITION_SIZE = 256


def _check(q, k_cache, v_cache, block_tables, context_lens, window, softcap) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, n_kv_heads, head_dim], got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    B, n_q, d = q.shape
    n_kv, d_kv = k_cache.shape[2], k_cache.shape[3]
    if d != d_kv:
        raise ValueError(f"head_dim mismatch: q has {d}, the cache has {d_kv}")
    if n_kv == 0 or n_q % n_kv:
        raise ValueError(f"n_q_heads ({n_q}) must be a multiple of n_kv_heads ({n_kv})")
    if not (q.is_floating_point() and k_cache.is_floating_point() and v_cache.is_floating_point()):
        raise ValueError("q, k_cache and v_cache must be floating point")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(
            f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (B,):
        raise ValueError(
            f"context_lens must be int32 [B={B}], got {context_lens.dtype} {tuple(context_lens.shape)}"
        )
    check_device(q, k_cache, v_cache, block_tables, context_lens)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, block_tables, context_lens, window, softcap)
    B, n_q, d = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    blocks, masked, n_slots = _plan(block_tables, context_lens, window, block_size, k_cache.shape[0])
    # On CPU this function is the serving path, and a decode step runs it once a layer: each torch op
    # here costs a few microseconds whatever its size, so it is written in as few ops as it takes (#24).
    # Gathered slots outside the context or the window may hold anything, NaN included (a cache from
    # torch.empty, a reused block). A K slot's score is overwritten by the mask; a V slot is
    # multiplied by its zero weight, and 0 * NaN is NaN, so V's are zeroed.
    k = k_cache.index_select(0, blocks).view(B, n_slots, n_kv, d)
    v = v_cache.index_select(0, blocks).view(B, n_slots, n_kv * d).masked_fill_(masked[:, :, None], 0.0)
    return attend_gathered(q, k, v.view(B, n_slots, n_kv, d), masked, scale, softcap)


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor, scale: float,
                    softcap: float | None) -> torch.Tensor:
    """Decode attention of q [B, n_q, d] over gathered k, v [B, slots, n_kv, d] (v zero where ``masked``
    [B, slots] says a slot does not count), in fp32; the answer in q's dtype. Also the compiled decode
    step's (engine/compiled_decode.py), over the cache plus the current token."""
    B, n_q, d = q.shape
    n_kv = k.shape[2]
    # GQA without repeating K/V: the `group` query heads that share kv head h (q head i uses kv
    # head i // group) become `group` query rows of that head.
    qf = q.reshape(B, n_kv, n_q // n_kv, d).float()
    scores = torch.matmul(qf, k.float().permute(0, 2, 3, 1)).mul_(scale)  # [B, n_kv, group, slots]
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    probs = scores.masked_fill_(masked[:, None, None, :], float("-inf")).softmax(-1)
    # an empty context (context_len 0) masks every slot: its softmax is 0/0, the answer is zeros
    out = torch.matmul(probs.nan_to_num_(0.0), v.float().transpose(1, 2))
    return out.view(B, n_q, d).to(q.dtype)


# The last plan and what it was made from. Every layer of one decode step passes the same block_tables
# and context_lens tensors (AttentionMetadata), so the gather indices and the mask (a dozen small ops)
# are made once per step instead of once per layer: on CPU a decode step is dominated by such small
# ops (#24). The entry holds the tensors themselves, so an identity match cannot be a new tensor at a
# freed one's address; ``_version`` catches one changed in place (inference-mode tensors have no
# version counter: the engine makes those afresh each step and never changes them).
_last_plan: tuple | None = None


def _plan(block_tables: torch.Tensor, context_lens: torch.Tensor, window: int | None, block_size: int,
          num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    global _last_plan
    key = (_version(block_tables), _version(context_lens), window, block_size, num_blocks)
    last = _last_plan
    if last is not None and last[0] is block_tables and last[1] is context_lens and last[2] == key:
        return last[3]
    plan = _make_plan(block_tables, context_lens, window, block_size, num_blocks)
    _last_plan = (block_tables, context_lens, key, plan)
    return plan


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _make_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, window: int | None, block_size: int,
               num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the cache blocks to gather, flat [B * cols]; which gathered slots do not count, [B, slots]; slots)."""
    device, B = block_tables.device, block_tables.shape[0]
    width = block_tables.shape[1]
    ctx = context_lens[:, None].long()
    cols = torch.arange(width, device=device)[None, :]  # which block-table entries to read
    reach = None if window is None else -(-window // block_size) + 1  # blocks a window can span
    if reach is not None and reach < width:  # read only those, from the block holding ctx - window
        cols = (ctx - window).clamp(min=0) // block_size + torch.arange(reach, device=device)[None, :]
    n_slots = cols.shape[1] * block_size
    # Gather every sequence's blocks once, as a contiguous [B, n_kv, slots, d] cache. Padding
    # entries may hold anything (0, -1, stale ids): clamp them to a real block so the gather is
    # legal; the mask gives those tokens no weight.
    # (index_select on the flat list, not k_cache[blocks]: torch's 2-D advanced indexing is ~20x
    # slower on CPU at decode shapes.)
    table = block_tables.long().gather(1, cols.clamp(max=width - 1).expand(B, -1))
    blocks = table.clamp(0, max(num_blocks - 1, 0)).reshape(-1)
    # a column past the table's end reads a clamped block, but its slots lie past the context
    slots = (cols[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)
    valid = slots < ctx  # [B, slots]
    if window is not None:  # the query sits at ctx - 1 and sees the last `window` tokens
        valid &= slots >= ctx - window
    return blocks, ~valid, n_slots


if HAS_TRITON:

    @jit
    def _partition_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr,
        m_ptr, l_ptr, acc_ptr,
        scale, window, softcap,
        q_stride_b, q_stride_h,
        k_stride_blk, k_stride_slot, k_stride_h,
        v_stride_blk, v_stride_slot, v_stride_h,
        bt_stride_b,
        n_parts,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        PARTITION_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        n_q = tl.num_programs(1) * GROUP

        ctx = tl.load(ctx_ptr + b)
        # Partitions are counted from the one holding the window's first token, lo, so a short
        # window over a long context needs few programs and none of them walks dead blocks.
        lo = tl.maximum(ctx - window, 0)
        start = (lo // PARTITION_SIZE + part) * PARTITION_SIZE
        end = tl.minimum(start + PARTITION_SIZE, ctx)
        # Chunks stay BLOCK_N-aligned; the first one's tokens before lo are masked, not loaded.
        first = tl.maximum(start, lo // BLOCK_N * BLOCK_N)

        g = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        d_mask = dd < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b.to(tl.int64) * q_stride_b + heads[:, None] * q_stride_h + dd[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        q = q * scale  # once here instead of on every score

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_G], 0.0, tl.float32)
        acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)

        # Only tokens in [lo, ctx) are visited, so neither block-table padding nor the entries
        # of blocks before the window (possibly freed and reused) are read.
        for n0 in range(first, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            t_mask = (toks >= lo) & (toks < end)
            page = tl.load(bt_ptr + b * bt_stride_b + toks // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
            slot = toks % PAGE_SIZE
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_ptr + page[:, None] * k_stride_blk + slot[:, None] * k_stride_slot + kvh * k_stride_h + dd[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            s = tsum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
            if USE_SOFTCAP:
                # tanh from exp, which every backend and the interpreter have:
                # tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|), which cannot overflow
                x = s / softcap
                e = tl.exp(-2.0 * tl.abs(x))
                t = (1.0 - e) / (1.0 + e)
                s = softcap * tl.where(x >= 0, t, -t)
            s = tl.where(t_mask[None, :], s, float("-inf"))
            # Every chunk holds at least one valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tmax(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tsum(p, axis=1)
            v = tl.load(
                v_ptr + page[:, None] * v_stride_blk + slot[:, None] * v_stride_slot + kvh * v_stride_h + dd[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            acc = acc * alpha[:, None] + tsum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new

        # Partials are [B, n_q, n_parts(, HEAD_DIM)], contiguous.
        row = (b.to(tl.int64) * n_q + heads) * n_parts + part
        # Partitions past the context store nothing; the reduce kernel never reads them.
        # (Written as a vector compare: the interpreter mis-types `vector & scalar` masks.)
        live = g < tl.where(start < ctx, GROUP, 0)
        tl.store(m_ptr + row, m_i, mask=live)
        tl.store(l_ptr + row, l_i, mask=live)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + dd[None, :], acc, mask=live[:, None] & d_mask[None, :])

    @jit
    def _reduce_kernel(
        m_ptr, l_ptr, acc_ptr, ctx_ptr, out_ptr,
        window,
        out_stride_b, out_stride_h,
        n_parts,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PARTITION_SIZE: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        n_q = tl.num_programs(1)
        ctx = tl.load(ctx_ptr + b)
        # Only partitions that held tokens were written; the rest are uninitialised memory.
        # (Counted from the partition of the window's first token, as the partition kernel does.)
        base = tl.maximum(ctx - window, 0) // PARTITION_SIZE * PARTITION_SIZE
        used = tl.minimum((ctx - base + PARTITION_SIZE - 1) // PARTITION_SIZE, n_parts)

        p = tl.arange(0, BLOCK_P)
        dd = tl.arange(0, BLOCK_D)
        p_mask = p < used
        d_mask = dd < HEAD_DIM
        row = (b.to(tl.int64) * n_q + h) * n_parts + p
        m = tl.load(m_ptr + row, mask=p_mask, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=p_mask, other=0.0)
        acc = tl.load(
            acc_ptr + row[:, None] * HEAD_DIM + dd[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0
        )

        m_max = tmax(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty context: avoid inf - inf
        w = tl.exp(m - m_max)
        denom = tsum(w * l, axis=0)
        num = tsum(w[:, None] * acc, axis=0)
        out = num / tl.where(denom > 0.0, denom, 1.0)
        tl.store(
            out_ptr + b.to(tl.int64) * out_stride_b + h * out_stride_h + dd,
            out.to(out_ptr.dtype.element_ty),
            mask=d_mask,
        )


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """``partition_size`` (a power of two) is the number of context tokens per program.

    The caller guarantees ``context_lens[b] <= block_tables.shape[1] * block_size``; checking
    it here would cost a device-to-host sync on every call.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, window, softcap)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged_decode_attention_ref")
    if partition_size < 1 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two, got {partition_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()

    B, n_q, d = q.shape
    _, page_size, n_kv, _ = k_cache.shape
    group = n_q // n_kv
    out = torch.empty((B, n_q, d), dtype=q.dtype, device=q.device)
    n_parts = triton.cdiv(block_tables.shape[1] * page_size, partition_size)
    if window is not None:
        # the window's tokens start anywhere inside their first partition
        n_parts = min(n_parts, triton.cdiv(window, partition_size) + 1)
    # int32 max stands for "no window": ctx - window cannot overflow and lo becomes 0
    window = (1 << 31) - 1 if window is None else min(window, (1 << 31) - 1)
    if B == 0 or n_parts == 0:
        return out.zero_()

    block_g = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(d)
    # The score and PV products are [BLOCK_G, BLOCK_N, BLOCK_D] register tiles. This cap with
    # 8 warps compiles without register spills on sm_80/sm_90 for group sizes 1-16 and
    # head_dim up to 256 (checked with cuobjdump -res-usage); larger tiles spill.
    block_n = max(8, min(32, 4096 // (block_g * block_d)))
    block_n = min(block_n, partition_size)

    m = torch.empty((B, n_q, n_parts), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, n_q, n_parts, d), dtype=torch.float32, device=q.device)
    _partition_kernel[(B, n_kv, n_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        m,
        l,
        acc,
        scale,
        window,
        1.0 if softcap is None else float(softcap),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        n_parts,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        PARTITION_SIZE=partition_size,
        BLOCK_N=block_n,
        USE_SOFTCAP=softcap is not None,
        num_warps=8,
    )
    _reduce_kernel[(B, n_q)](
        m,
        l,
        acc,
        context_lens,
        out,
        window,
        out.stride(0),
        out.stride(1),
        n_parts,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PARTITION_SIZE=partition_size,
        BLOCK_P=triton.next_power_of_2(n_parts),
    )
    return out
