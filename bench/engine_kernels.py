"""CUDA-only tables of bench/engine.py: each Triton kernel vs torch eager and torch.compile of its
reference at Llama-3-8B shapes, and paged decode attention vs F.scaled_dot_product_attention on a
contiguous KV cache; every figure as GB/s against the device-to-device copy bandwidth."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.attention_ref import contiguous_kv, has_sdpa_gqa, length_mask, sdpa_contiguous
from bench.roofline import time_ms


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096  # Llama-3-8B
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    decode_batch: int = 32
    decode_ctx: int = 2048
    block: int = 16


LLAMA3_8B = Shapes()


def kernel_fns(triton: bool) -> dict:
    """name -> (kernel under test, torch reference). triton=False puts the references in both
    places: only for exercising this table's code on a machine without CUDA."""
    from services.inference_worker import kernels as K

    names = ["rms_norm", "rms_norm_residual", "rope", "swiglu", "paged_decode_attention"]
    return {n: (getattr(K, f"{n}_triton" if triton else f"{n}_ref"), getattr(K, f"{n}_ref"))
            for n in names}


def bench_kernels(dtype: torch.dtype, tokens: int, copy_gbs: float, dev: str = "cuda",
                  shapes: Shapes = LLAMA3_8B, triton: bool = True, compile_: bool = True) -> dict:
    S, dt, T = shapes, dtype, tokens
    H, I, NQ, D = S.hidden, S.intermediate, S.heads, S.head_dim
    e = torch.empty((), dtype=dt).element_size()
    where = torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else "CPU"
    print(f"\n## Kernels on {where} ({dt}); bandwidth reference: "
          f"device-to-device copy = {copy_gbs:.0f} GB/s")
    x, res, w = (torch.randn(T, H, device=dev, dtype=dt), torch.randn(T, H, device=dev, dtype=dt),
                 torch.randn(H, device=dev, dtype=dt))
    q = torch.randn(T, NQ, D, device=dev, dtype=dt)
    cos, sin = torch.randn(T, D // 2, device=dev), torch.randn(T, D // 2, device=dev)
    gu = torch.randn(T, 2 * I, device=dev, dtype=dt)
    att = decode_inputs(dt, dev, S, equal_lengths=False)
    fns = kernel_fns(triton)
    args = {"rms_norm": ((x, w, 1e-5), 2 * T * H * e),
            "rms_norm_residual": ((x, res, w, 1e-5), 4 * T * H * e),
            "rope": ((q, cos, sin), 2 * q.numel() * e + 2 * cos.numel() * 4),
            "swiglu": ((gu,), 3 * T * I * e),
            "paged_decode_attention": (att["call"], att["bytes"])}
    cases = [(n, *fns[n], *args[n]) for n in fns]
    print(f"shapes: T={T} tokens, hidden {H}, intermediate {I}, heads {NQ}/{S.kv_heads}x{D}; "
          f"decode: batch {S.decode_batch}, context {S.decode_ctx // 2}-{S.decode_ctx}, "
          f"block {S.block}")
    print("| kernel | triton GB/s | % of copy | torch eager GB/s | torch.compile GB/s | "
          "triton vs eager | triton vs compile |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for kname, tri, ref, a, nbytes in cases:
        t_tri, t_ref = time_ms(lambda: tri(*a), dev), time_ms(lambda: ref(*a), dev)
        t_comp = float("nan")
        try:
            if compile_:
                comp = torch.compile(ref, dynamic=False)
                comp(*a)
                t_comp = time_ms(lambda: comp(*a), dev)
        except Exception as ex:  # report, keep going
            print(f"  (torch.compile failed for {kname}: {type(ex).__name__}: {ex})")
        gbs = lambda ms: nbytes / ms / 1e6  # noqa: E731
        rows[kname] = {"triton_gbs": gbs(t_tri), "eager_gbs": gbs(t_ref), "compile_gbs": gbs(t_comp),
                       "pct_of_copy": 100 * gbs(t_tri) / copy_gbs}
        print(f"| {kname} | {gbs(t_tri):.0f} | {100 * gbs(t_tri) / copy_gbs:.0f}% | {gbs(t_ref):.0f} | "
              f"{gbs(t_comp):.0f} | {t_ref / t_tri:.2f}x | {t_comp / t_tri:.2f}x |", flush=True)
    rows["attention_vs_sdpa"] = attention_vs_sdpa(dt, copy_gbs, dev, S, fns["paged_decode_attention"][0])
    return rows


def decode_inputs(dt, dev, S: Shapes, equal_lengths: bool) -> dict:
    """Paged decode attention inputs: a shuffled block table, and context lengths either all
    decode_ctx or spread over decode_ctx/2..decode_ctx. bytes = the K/V actually attended plus q and
    the output."""
    B, ctx, NQ, NKV, D = S.decode_batch, S.decode_ctx, S.heads, S.kv_heads, S.head_dim
    nblk = B * ctx // S.block
    kc, vc = (torch.randn(nblk, S.block, NKV, D, device=dev, dtype=dt) for _ in range(2))
    bt = torch.randperm(nblk, device=dev, dtype=torch.int32).view(B, ctx // S.block)
    lens = (torch.full((B,), ctx, device=dev, dtype=torch.int32) if equal_lengths else
            torch.randint(ctx // 2, ctx + 1, (B,), device=dev, dtype=torch.int32))
    qd = torch.randn(B, NQ, D, device=dev, dtype=dt)
    e = qd.element_size()
    kv_bytes = int(lens.sum()) * NKV * D * 2 * e
    return {"call": (qd, kc, vc, bt, lens, D ** -0.5), "bytes": kv_bytes + 2 * qd.numel() * e,
            "kv_bytes": kv_bytes}


def attention_vs_sdpa(dt, copy_gbs: float, dev: str, S: Shapes, paged) -> dict:
    """The paged kernel next to SDPA on a cache that is already contiguous [B, n_kv, L, D]: equal
    lengths (no mask: SDPA's fastest case), and spread lengths, where SDPA reads the cache padded to
    the longest context under a mask. GB/s counts the K/V bytes attended, alike for both."""
    B, ctx, NQ, NKV, D = S.decode_batch, S.decode_ctx, S.heads, S.kv_heads, S.head_dim
    gqa = has_sdpa_gqa()
    print(f"\n### Paged decode attention ({getattr(paged, '__name__', paged)}) vs "
          f"F.scaled_dot_product_attention on a contiguous cache (batch {B}, heads {NQ}/{NKV}x{D}, {dt}; "
          f"{'enable_gqa' if gqa else 'K/V pre-expanded to the query heads: SDPA reads 4x the bytes'})")
    print("| lengths | kernel | µs | GB/s over the KV cache | % of copy | paged / SDPA time |")
    print("|---|---|---|---|---|---|")
    out = {}
    for equal in (True, False):
        inp = decode_inputs(dt, dev, S, equal_lengths=equal)
        q, kc, vc, bt, lens, scale = inp["call"]
        k, v = contiguous_kv(kc, vc, bt, ctx)
        if not gqa:
            k, v = k.repeat_interleave(NQ // NKV, 1), v.repeat_interleave(NQ // NKV, 1)
        mask = None if equal else length_mask(lens, ctx)
        got = paged(*inp["call"])
        dense = sdpa_contiguous(q, k, v, scale, mask)
        err = ((got.float() - dense.float()).norm() / dense.float().norm()).item()
        t_paged = time_ms(lambda: paged(*inp["call"]), dev)
        t_sdpa = time_ms(lambda: sdpa_contiguous(q, k, v, scale, mask), dev)
        label = f"all {ctx}" if equal else f"{ctx // 2}-{ctx}, SDPA padded + mask"
        key = "equal" if equal else "spread"
        out[key] = {"paged_us": t_paged * 1e3, "sdpa_us": t_sdpa * 1e3, "rel_err": err,
                    "paged_gbs": inp["kv_bytes"] / t_paged / 1e6, "sdpa_gbs": inp["kv_bytes"] / t_sdpa / 1e6}
        for name, ms in (("paged", t_paged), ("SDPA contiguous", t_sdpa)):
            gbs = inp["kv_bytes"] / ms / 1e6
            print(f"| {label} | {name} | {ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
                  f"{t_paged / t_sdpa:.2f}x |")
        print(f"  ({label}: ‖paged − SDPA‖ / ‖SDPA‖ = {err:.1e})", flush=True)
    return out
