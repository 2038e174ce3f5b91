"""Engine benchmark: the Strata engine next to HF transformers.generate on the same checkpoint, in the
same run; the batch-1 decode roofline; batched decode through the continuous-batching engine; on CUDA
also each Triton kernel vs torch eager / torch.compile and paged attention vs SDPA on a contiguous cache.

    python bench/engine.py                             # small random-weight Llama made on the fly
    python bench/engine.py --preset llama3-8b --batch-sizes 1,64   # the GPU rows of issue #11
    python bench/engine.py --checkpoint DIR            # any supported HF checkpoint directory

Every sequence produces exactly --new-tokens greedy tokens (eos ignored on both sides).
- decode tok/s: tokens after the prefill / the time they took. Strata: per-token host timestamps from
  the engine's stream callbacks (the engine samples to host ints, so a token is done when streamed);
  HF: the same, from a streamer's timestamps (first new token, the prefill's, to the last).
- whole-run tok/s: tokens / wall time of the whole call, prefill included.
- ITL: inter-token latency, the gaps between a request's consecutive tokens (all requests pooled).
- roofline (batch 1): copy bandwidth / bytes read per token, where the bytes are every parameter but
  the embedding table (gathered, one row; counted when tied to the output projection) plus the KV
  cache at the mean decode context.
Best of --repeat runs that alternate between the engines; ITL pooled over all runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.host import loadavg  # noqa: E402
from bench.engine_runners import HFBench, StrataBench, hf_variants  # noqa: E402
from bench.roofline import (copy_bandwidth_gbs, kv_bytes_per_token, percentile,  # noqa: E402
                            weight_bytes_read_per_step)

PRESETS = {
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                      dtype="bfloat16", max_position=8192, rope_theta=500000.0),
    # CPU-sized shapes of the other kinds of model: routed experts, and a window the prompt overruns
    "moe": dict(arch="mixtral", experts=8, experts_per_tok=2, intermediate=512),
    "sliding-window": dict(arch="mistral", sliding_window=64, prompt_tokens=160),
}
ARCHS = {"llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral"}  # --arch -> transformers prefix


# ---- the checkpoint ------------------------------------------------------------------------------
def make_checkpoint(args, root: Path, device: str, dtype: torch.dtype):
    """A random-weight ``--arch`` model built directly on ``device`` in ``dtype`` (an 8B model never
    exists as float32 on the host), saved as safetensors, plus a word-level tokenizer over its whole
    vocabulary. Returns (path, the model in memory, timings)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    t0 = time.perf_counter()
    prefix = ARCHS[args.arch]
    extra = {}
    if args.arch == "mixtral":
        extra = dict(num_local_experts=args.experts, num_experts_per_tok=args.experts_per_tok)
    if args.sliding_window:
        extra["sliding_window"] = args.sliding_window
    cfg = getattr(transformers, f"{prefix}Config")(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_position,
        rope_theta=args.rope_theta, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the constructor allocates and initialises in this dtype...
    try:
        with torch.device(device):  # ...on this device
            model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # never time on zeros or garbage: initialise whatever the constructor left
        for name, p in model.named_parameters():
            if p.dim() > 1 and not (torch.isfinite(p).all() and p.abs().amax() > 0):
                p.normal_(0.0, 0.02)
    sync_device(device)
    t_init = time.perf_counter() - t0
    path = root / f"bench-{args.arch}"
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, max_shard_size="4GB")  # safetensors; shards keep host memory low
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    if name not in (saved.get("dtype"), saved.get("torch_dtype")):  # the engine loads in this dtype
        saved.update(dtype=name, torch_dtype=name)
        config_file.write_text(json.dumps(saved, indent=2))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    timing = {"init_s": t_init, "save_s": time.perf_counter() - t0 - t_init, "bytes": size}
    return path, model, timing


def load_hf(path: Path, device: str, dtype: torch.dtype):
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()


def sync_device(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
    dev = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
           if torch.device(device).type == "cuda" else f"CPU ({cpu})")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {dev}; "
            f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, "
            f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model shape (and dtype) of a known model")
    ap.add_argument("--checkpoint", help="HF checkpoint dir (default: random Llama made on the fly)")
    ap.add_argument("--checkpoint-dir", type=Path, help="where to write the random checkpoint and keep "
                    "it (default: a temporary folder, removed at the end)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32/bfloat16/float16 "
                    "(default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="family of the random model")
    ap.add_argument("--experts", type=int, default=8, help="--arch mixtral: routed experts per layer")
    ap.add_argument("--experts-per-tok", type=int, default=2, help="--arch mixtral: experts per token")
    ap.add_argument("--sliding-window", type=int, default=None,
                    help="--arch mistral/mixtral: attention window in tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-position", type=int, default=4096)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--kernel-tokens", type=int, default=4096, help="tokens for kernel shapes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a busy box")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per row, alternating engines; the best of each is reported")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="HF baseline with a static cache + torch.compile(mode='default'), at the "
                    "smallest batch size (default: on for CUDA; off on CPU, where it runs the static "
                    "cache without compile)")
    ap.add_argument("--hf-batch-sizes", default=None,
                    help="batch sizes that get HF baselines (default: all of --batch-sizes)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--only-kernels", action="store_true",
                    help="only the kernel and attention tables (CUDA), no model")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode throughput needs tokens after the first)")
    if args.hf_compile is None:
        args.hf_compile = args.device.startswith("cuda")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # `timeout` sends SIGTERM: exit through the finally below, so --json keeps what was measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.threads:
        torch.set_num_threads(args.threads)
    from services.inference_worker.api import parse_dtype

    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    batches = sorted({int(b) for b in args.batch_sizes.split(",")})
    report: dict = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"# Strata engine benchmark\nmachine: {report['machine']}; load {loadavg()}", flush=True)
    copy_gbs, copy_how = copy_bandwidth_gbs(args.device)
    report["copy_gbs"] = copy_gbs
    print(f"bandwidth: {copy_gbs:.0f} GB/s ({copy_how})", flush=True)
    try:
        if not args.only_kernels:
            run_model(args, dtype, batches, copy_gbs, report)
        if not args.skip_kernels:
            run_kernels(args, dtype, copy_gbs, report)
    finally:  # what was measured is kept even when a later part fails
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


def run_model(args, dtype, batches: list[int], copy_gbs: float, report: dict) -> None:
    tmp = None if args.checkpoint_dir else tempfile.TemporaryDirectory()
    try:
        hf = None
        if args.checkpoint:
            path = Path(args.checkpoint)
        else:
            root = args.checkpoint_dir or Path(tmp.name)
            root.mkdir(parents=True, exist_ok=True)
            path, hf, made = make_checkpoint(args, root, args.device, dtype)
            report["checkpoint_made"] = made
            print(f"checkpoint: made in {made['init_s']:.1f} s (random init on {args.device}, {dtype}) "
                  f"+ {made['save_s']:.1f} s (safetensors, {made['bytes'] / 1e9:.2f} GB) at {path}",
                  flush=True)
        report["checkpoint"] = str(path)
        if args.skip_hf:
            hf = None
        elif hf is None:
            hf = load_hf(path, args.device, dtype)
        gc.collect()
        run_rows(args, path, dtype, batches, hf, copy_gbs, report)
        del hf
    finally:
        if tmp is not None:
            tmp.cleanup()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_kernels(args, dtype, copy_gbs: float, report: dict) -> None:
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        print("\nKernel and attention tables skipped: they time the Triton kernels, which run on "
              "CUDA only (on CPU the engine uses their torch references; bench/attention_ref.py "
              "times those next to SDPA on a contiguous cache).")
        return
    from bench.engine_kernels import bench_kernels
    try:
        report["kernels"] = bench_kernels(dtype if dtype != torch.float32 else torch.bfloat16,
                                          args.kernel_tokens, copy_gbs)
    except Exception as ex:  # the throughput rows stand on their own
        print(f"\nKernel table failed: {type(ex).__name__}: {ex}")
        report["kernels_error"] = f"{type(ex).__name__}: {ex}"


def run_rows(args, path: Path, dtype, batches: list[int], hf, copy_gbs: float, report: dict) -> None:
    cfg = json.loads((path / "config.json").read_text())
    desc = (f"{cfg['architectures'][0]} hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
            f"layers, heads {cfg['num_attention_heads']}/{cfg.get('num_key_value_heads')}, "
            f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}"
            + (f", {cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}"
               if cfg.get("num_local_experts") else "")
            + (f", sliding window {cfg['sliding_window']}" if cfg.get("sliding_window") else ""))
    print(f"model: {desc}{'' if args.checkpoint else ' (random weights)'}; device {args.device}, "
          f"{dtype}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy",
          flush=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg["vocab_size"], (max(batches), args.prompt_tokens), generator=g).tolist()
    t = time.perf_counter()
    ours = StrataBench(path, args.device, dtype, max(batches), args.prompt_tokens, args.new_tokens)
    print(f"strata engine loaded in {time.perf_counter() - t:.1f} s", flush=True)
    variants = hf_variants(hf, args.device, args.hf_compile) if hf is not None else []
    hf_batches = ({int(b) for b in args.hf_batch_sizes.split(",")} if args.hf_batch_sizes
                  else set(batches))
    rows = []
    # rows without an HF baseline first: if a long compile runs out of time, they are already done
    for b in sorted(batches, key=lambda b: (b in hf_batches, b)):
        row = {"batch": b}
        ours.warm(prompts[:b])
        ids = torch.tensor(prompts[:b], device=args.device)
        benches = []
        for v in variants:
            if b not in hf_batches or ("static" in v.name and b != min(hf_batches)):
                continue  # one static-cache shape (and compile) per run: the smallest HF batch
            hb = HFBench(hf, v, args.device, args.new_tokens)
            try:
                hb.warm(ids)
                benches.append(hb)
                compiled = hb.compiled()
                note = "" if compiled is None else f"; compiled: {compiled}"
                print(f"{v.name} @ batch {b}: {v.how}; warm-up {hb.warm_s:.1f} s{note}", flush=True)
                row.setdefault("hf_setup", {})[v.name] = {"how": v.how, "warm_s": hb.warm_s,
                                                          "compiled": compiled}
            except Exception as ex:  # a baseline that cannot run is reported, not fatal
                msg = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
                print(f"{v.name} @ batch {b} FAILED ({v.how}): {msg}", flush=True)
                row.setdefault("hf_errors", {})[v.name] = msg
        runs, times = [], {hb.v.name: [] for hb in benches}
        for _ in range(args.repeat):  # alternate, so load from elsewhere hits all alike
            runs.append(ours.run(prompts[:b]))
            for hb in list(benches):
                try:
                    times[hb.v.name].append(hb.run(ids))
                except Exception as ex:  # drop that baseline, keep the row
                    print(f"{hb.v.name} @ batch {b} FAILED while timed: {type(ex).__name__}: {ex}")
                    row.setdefault("hf_errors", {})[hb.v.name] = f"{type(ex).__name__}: {ex}"
                    benches.remove(hb)
        gaps = [x for r in runs for x in r.gaps_s]
        row.update(strata_whole=max(r.whole_tok_s for r in runs),
                   strata_decode=max(r.decode_tok_s for r in runs),
                   itl_p50_ms=1e3 * percentile(gaps, 50), itl_p99_ms=1e3 * percentile(gaps, 99),
                   itl_samples=len(gaps))
        for hb in benches:
            whole, decode = hb.rates(min(x[0] for x in times[hb.v.name]),
                                     min(x[1] for x in times[hb.v.name]), b)
            row.setdefault("hf", {})[hb.v.name] = {"whole": whole, "decode": decode}
        rows.append(row)
        report["rows"] = rows
        hf_line = ", ".join(f"{n} {fmt(x['decode'])}" for n, x in row.get("hf", {}).items())
        print(f"batch {b}: strata decode {fmt(row['strata_decode'])} tok/s (whole run "
              f"{fmt(row['strata_whole'])}), ITL p50 {fmt(row['itl_p50_ms'], '.2f')} ms"
              f"{'; HF decode tok/s: ' + hf_line if hf_line else ''}", flush=True)
        gc.collect()
    rows.sort(key=lambda r: r["batch"])
    names = [v.name for v in variants]
    print_throughput(rows, names, args.repeat)
    print_roofline(ours, rows, batches, names, copy_gbs, args, report)
    print_batched(rows, batches, report)


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None or x != x else format(x, spec)


def print_throughput(rows, names, repeat) -> None:
    head = " | ".join(f"{n} decode tok/s" for n in names)
    ratios = " | ".join(f"strata / {n}" for n in names)
    cols = 4 + 2 * len(names)
    print(f"\n## Throughput (best of {repeat}; decode = after the prefill; load {loadavg()})")
    print(f"| batch | strata whole-run tok/s | strata decode tok/s | {head}{' | ' if names else ''}"
          f"{ratios}{' | ' if names else ''}strata ITL p50 / p99 ms |")
    print("|" + "---|" * cols)
    for r in rows:
        hf = r.get("hf", {})
        vals = [fmt(hf.get(n, {}).get("decode")) for n in names]
        rat = [fmt(r["strata_decode"] / hf[n]["decode"], ".2f") + "x" if n in hf else "—" for n in names]
        mid = " | ".join(vals + rat)
        print(f"| {r['batch']} | {fmt(r['strata_whole'])} | {fmt(r['strata_decode'])} | "
              f"{mid}{' | ' if names else ''}{fmt(r['itl_p50_ms'], '.2f')} / {fmt(r['itl_p99_ms'], '.2f')} |")


def print_roofline(ours, rows, batches, names, copy_gbs, args, report) -> None:
    eng = ours.engine
    mc = eng.model_config
    routed = mc.num_experts_per_tok / mc.num_experts if mc.num_experts else 1.0
    weights, embed = weight_bytes_read_per_step(eng.ckpt.model, mc.tie_word_embeddings, routed)
    kv_tok = kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, eng.dtype.itemsize)
    mean_ctx = args.prompt_tokens + args.new_tokens / 2  # decode steps attend over P+1 .. P+N-1
    if mc.sliding_window and all(mc.layer_windows):  # a windowed step reads at most the window
        mean_ctx = min(mean_ctx, mc.sliding_window)
    per_token = weights + kv_tok * mean_ctx
    roof = copy_gbs * 1e9 / per_token
    report["roofline"] = {"weights_bytes": weights, "embedding_bytes": embed, "kv_bytes_per_ctx": kv_tok,
                          "mean_context": mean_ctx, "bytes_per_token": per_token, "tok_s": roof}
    tied = "; it is tied to lm_head, so read whole" if mc.tie_word_embeddings else ""
    print(
        f"\n## Batch-1 decode vs the memory-bandwidth roofline\nbytes per token: weights "
        f"{weights / 1e9:.3f} GB (every parameter but the {embed / 1e9:.3f} GB embedding table, "
        f"which is only gathered{tied}"
        f"{f'; of the experts, the {mc.num_experts_per_tok} of {mc.num_experts}' if mc.num_experts else ''}"
        f"{' a token is routed to' if mc.num_experts else ''})"
        f" + KV cache {kv_tok * mean_ctx / 1e6:.2f} MB at the mean decode context {mean_ctx:.0f} = "
        f"{per_token / 1e9:.3f} GB; bandwidth {copy_gbs:.0f} GB/s (copy) -> roofline {roof:.1f} tok/s"
    )
    one = next((r for r in rows if r["batch"] == 1), None)
    if one is None:
        print("(no batch-1 row: add 1 to --batch-sizes)")
        return
    print("| engine | decode tok/s | % of roofline |\n|---|---|---|")
    entries = [("strata", one["strata_decode"])] + [(n, one.get("hf", {}).get(n, {}).get("decode")) for n in names]
    for name, v in entries:
        pct = None if v is None else 100 * v / roof
        report["roofline"][f"{name}_pct"] = pct
        print(f"| {name} | {fmt(v)} | {fmt(pct, '.0f')}{'' if pct is None else '%'} |")
    for n in names:
        ref = one.get("hf", {}).get(n, {}).get("decode")
        if ref:
            print(f"strata / {n} at batch 1 (decode): {one['strata_decode'] / ref:.2f}x")
    print("targets (issue #11, GPU): >= 85% of roofline; >= 3x HF static+compile", flush=True)


def print_batched(rows, batches, report) -> None:
    one = next((r for r in rows if r["batch"] == 1), None)
    big = [r for r in rows if r["batch"] > 1]
    if not big:
        return
    print("\n## Batched decode through the continuous-batching engine (all requests added at once)")
    print(
        "| concurrent requests | decode tok/s | x batch-1 decode | ITL p50 ms | ITL p99 ms | "
        "whole-run tok/s | gaps |\n|---|---|---|---|---|---|---|"
    )
    for r in big:
        x = r["strata_decode"] / one["strata_decode"] if one else None
        r["x_batch1"] = x
        print(
            f"| {r['batch']} | {fmt(r['strata_decode'])} | {fmt(x, '.1f')}{'' if x is None else 'x'} | "
            f"{fmt(r['itl_p50_ms'], '.2f')} | {fmt(r['itl_p99_ms'], '.2f')} | {fmt(r['strata_whole'])} | "
            f"{r['itl_samples']} |"
        )
    print("target (issue #11, GPU, 64 requests): >= 15x batch-1 decode throughput", flush=True)


if __name__ == "__main__":
    main()
