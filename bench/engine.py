"""Engine benchmark: generation throughput of the Strata engine vs HF transformers.generate on the
same checkpoint, in the same run; on CUDA also each Triton kernel vs torch eager and torch.compile.

    python bench/engine.py                       # random-weight Llama made on the fly, CPU or GPU
    python bench/engine.py --checkpoint DIR      # any supported HF checkpoint directory
    python bench/engine.py --hidden 2048 --layers 16 --batch-sizes 1,32,64 --new-tokens 128

Throughput is generated tokens / wall time of the whole generate call (prefill included), greedy,
every sequence producing exactly --new-tokens tokens (eos ignored on both sides); best of --repeat
runs that alternate between the two engines.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


# ---- the checkpoint ------------------------------------------------------------------------------
def make_checkpoint(args, root: Path) -> Path:
    """A random-weight LlamaForCausalLM and a word-level tokenizer covering its whole vocabulary."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = root / "bench-llama"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


# ---- throughput ----------------------------------------------------------------------------------
def strata_runner(path, device, dtype, batch, prompts, new_tokens):
    """An engine sized for this row, warmed up; returns a function timing one generate call."""
    from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams

    prompt_len = len(prompts[0])
    blocks = batch * (-(-(prompt_len + new_tokens) // 16) + 1) + 8
    eng = LLMEngine.from_pretrained(path, EngineConfig(
        device=device, dtype=dtype, num_blocks=blocks, block_size=16, max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(batch * prompt_len, 512)))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    eng.generate(prompts[:batch], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))

    def run() -> float:
        sync(device)
        t = time.perf_counter()
        outs = eng.generate(prompts[:batch], params)
        sync(device)
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == new_tokens for o in outs)
        return batch * new_tokens / dt

    return run


def hf_runner(hf, device, batch, prompts, new_tokens):
    ids = torch.tensor(prompts[:batch], device=device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)

    def run() -> float:
        with torch.inference_mode():
            sync(device)
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            sync(device)
        dt = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == new_tokens
        return batch * new_tokens / dt

    return run


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- kernels (CUDA only) -------------------------------------------------------------------------
def time_ms(fn, iters=50) -> float:
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)


def bench_kernels(dtype: torch.dtype, tokens: int, dev: str = "cuda") -> None:
    from services.inference_worker import kernels as K

    dt = dtype
    name = torch.cuda.get_device_name(dev)
    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = time_ms(lambda: copy_dst.copy_(copy_src))
    peak = 2 * copy_src.numel() / copy_ms / 1e6  # GB/s, read + write
    del copy_src, copy_dst
    print(f"\n## Kernels on {name} ({dt}); bandwidth reference: device-to-device copy of 1 GiB "
          f"= {peak:.0f} GB/s")
    T, H, I, nq, nkv, D = tokens, 4096, 14336, 32, 8, 128  # Llama-3-8B-like shapes
    e = torch.empty((), dtype=dt).element_size()
    x, res, w = (torch.randn(T, H, device=dev, dtype=dt), torch.randn(T, H, device=dev, dtype=dt),
                 torch.randn(H, device=dev, dtype=dt))
    q = torch.randn(T, nq, D, device=dev, dtype=dt)
    cos, sin = torch.randn(T, D // 2, device=dev), torch.randn(T, D // 2, device=dev)
    gu = torch.randn(T, 2 * I, device=dev, dtype=dt)
    B, ctx, bs = 32, 2048, 16
    nblk = B * ctx // bs
    kc, vc = (torch.randn(nblk, bs, nkv, D, device=dev, dtype=dt) for _ in range(2))
    bt = torch.randperm(nblk, device=dev, dtype=torch.int32).view(B, ctx // bs)
    lens = torch.randint(ctx // 2, ctx + 1, (B,), device=dev, dtype=torch.int32)
    qd = torch.randn(B, nq, D, device=dev, dtype=dt)
    attn_bytes = int(lens.sum()) * nkv * D * 2 * e + 2 * qd.numel() * e
    cases = [
        ("rms_norm", K.rms_norm_triton, K.rms_norm_ref, (x, w, 1e-5), 2 * T * H * e),
        ("rms_norm_residual", K.rms_norm_residual_triton, K.rms_norm_residual_ref, (x, res, w, 1e-5),
         4 * T * H * e),
        ("rope", K.rope_triton, K.rope_ref, (q, cos, sin), 2 * q.numel() * e + 2 * cos.numel() * 4),
        ("swiglu", K.swiglu_triton, K.swiglu_ref, (gu,), 3 * T * I * e),
        ("paged_decode_attention", K.paged_decode_attention_triton, K.paged_decode_attention_ref,
         (qd, kc, vc, bt, lens, D ** -0.5), attn_bytes),
    ]
    print(f"shapes: T={T} tokens, hidden {H}, intermediate {I}, heads {nq}/{nkv}x{D}; decode: "
          f"batch {B}, context {ctx // 2}-{ctx}, block {bs}")
    print(f"| kernel | triton GB/s | % of copy | torch eager GB/s | torch.compile GB/s | "
          f"triton vs eager | triton vs compile |")
    print("|---|---|---|---|---|---|---|")
    for kname, tri, ref, a, nbytes in cases:
        t_tri, t_ref = time_ms(lambda: tri(*a)), time_ms(lambda: ref(*a))
        try:
            comp = torch.compile(ref, dynamic=False)
            comp(*a)
            t_comp = time_ms(lambda: comp(*a))
        except Exception as ex:  # report, keep going
            print(f"  (torch.compile failed for {kname}: {type(ex).__name__}: {ex})")
            t_comp = float("nan")
        gbs = lambda ms: nbytes / ms / 1e6
        print(f"| {kname} | {gbs(t_tri):.0f} | {100 * gbs(t_tri) / peak:.0f}% | {gbs(t_ref):.0f} | "
              f"{gbs(t_comp):.0f} | {t_ref / t_tri:.2f}x | {t_comp / t_tri:.2f}x |")


# ---- main ----------------------------------------------------------------------------------------
def machine(device: str) -> str:
    import transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({cpu})"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {dev}; "
            f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, "
            f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", help="HF checkpoint dir (default: random Llama made on the fly)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32/bfloat16/float16 "
                    "(default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--kernel-tokens", type=int, default=4096, help="tokens for kernel shapes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a busy box")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per row, alternating engines; the best of each is reported")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from services.inference_worker.engine.config import parse_dtype

    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# Strata engine benchmark\nmachine: {machine(args.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args, Path(tmp))
        cfg = json.loads((path / "config.json").read_text())
        desc = (f"{cfg['architectures'][0]} hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
                f"layers, heads {cfg['num_attention_heads']}/{cfg.get('num_key_value_heads')}, "
                f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}")
        print(f"model: {desc}{'' if args.checkpoint else ' (random weights)'}; device {args.device}, "
              f"{dtype}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy")
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, cfg["vocab_size"], (max(batches), args.prompt_tokens),
                                generator=g).tolist()
        hf = None
        if not args.skip_hf:
            import transformers
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(args.device).eval()
        print(f"\n| batch | strata tok/s | HF generate tok/s | strata / HF |  (best of {args.repeat})"
              "\n|---|---|---|---|")
        for b in batches:
            ours_run = strata_runner(path, args.device, dtype, b, prompts, args.new_tokens)
            hf_run = hf_runner(hf, args.device, b, prompts, args.new_tokens) if hf is not None else None
            ours, ref = [], []
            for _ in range(args.repeat):  # alternate, so load from elsewhere hits both alike
                ours.append(ours_run())
                ref.append(hf_run() if hf_run else float("nan"))
            del ours_run
            gc.collect()
            print(f"| {b} | {max(ours):.1f} | {max(ref):.1f} | {max(ours) / max(ref):.2f}x |",
                  flush=True)
        del hf
    if args.skip_kernels:
        return
    if not torch.cuda.is_available():
        print("\nKernel benchmark skipped: no CUDA device here (the Triton kernels run on GPU only; "
              "on CPU the engine uses their torch references).")
        return
    bench_kernels(dtype if dtype != torch.float32 else torch.bfloat16, args.kernel_tokens)


if __name__ == "__main__":
    main()
