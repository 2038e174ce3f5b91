"""Runtimes benchmark: the same random-weight Llama through Strata's engine (safetensors, fp32 and bf16)
and through the worker's llama.cpp runtime (GGUF F16, Q8_0 and Q4_K_M), batch-1 decode, in one run.

    python bench/runtimes.py                       # hidden 1024, 16 layers (~270M parameters), issue #17's shape
    python bench/runtimes.py --hidden 256 --layers 4 --new-tokens 32 --repeat 1   # a quick look

Both runtimes are driven the same way, through the interface the worker uses (add_request with a
stream callback, step): every request makes exactly --new-tokens greedy tokens (eos ignored) from a
--prompt-tokens prompt. decode tok/s = (tokens - 1) / (time of the last token - time of the first):
the prefill is left out. Q8_0 and Q4_K_M are made from the F16 file with llama.cpp's own quantizer
(llama_model_quantize). Runs alternate between the runtimes, --repeat times, and the best of each is
reported with the load average (the machine is shared: the spread says how noisy the figures are).
The in-process runtime, not the gateway: the HTTP path is the same for both runtimes (bench/load.py).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.engine_runners import Variant  # noqa: E402
from bench.host import loadavg  # noqa: E402


def quantize(src: Path, dst: Path, ftype: int, threads: int) -> Path:
    import llama_cpp as C

    from services.inference_worker.api import init_backend

    init_backend()  # llama.cpp's log to Python's logging, before the quantizer talks

    params = C.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed")
    return dst


def decode_tok_s(engine, prompt: list[int], new_tokens: int) -> float:
    from services.inference_worker.api import SamplingParams

    stamps: list[float] = []

    def on_event(event) -> None:
        stamps.extend([time.perf_counter()] * len(event.token_ids))

    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True), callback=on_event)
    while engine.has_unfinished():
        engine.step()
    assert len(stamps) == new_tokens, f"{len(stamps)} tokens, not {new_tokens}"
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def aggregate_tok_s(engine, prompt: list[int], new_tokens: int, n: int) -> float:
    """``n`` requests submitted together (distinct prompts): generated tokens / wall time, prefill included."""
    from services.inference_worker.api import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate([prompt[i:] + prompt[:i] for i in range(n)], params)
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return n * new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--concurrent", type=int, default=8, help="also: this many requests decoded together (0: skip)")
    ap.add_argument("--variants", default="engine-fp32,engine-bf16,llama.cpp-F16,llama.cpp-Q8_0,llama.cpp-Q4_K_M",
                    help="also engine-int8, engine-int4 (weight-only, bf16 compute); any engine-X-nogemv (without "
                    "kernels/cpu_gemv.py: torch's kernels); any engine-X-compiled (the compiled decode step)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from services.inference_worker.api import EngineConfig, LLMEngine, LlamaCppEngine
    from tests.support.gguf_model import write_random_pair

    wanted = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        context = max(256, args.prompt_tokens + args.new_tokens + 8)
        ckpt, ggufs = write_random_pair(
            root,
            ("f16",),
            seed=0,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            context=context,
            vocab_size=args.vocab,
        )
        files = {"F16": ggufs["f16"]}
        if "llama.cpp-Q8_0" in wanted:
            files["Q8_0"] = quantize(ggufs["f16"], root / "model.Q8_0.gguf", 7, args.threads)
        if "llama.cpp-Q4_K_M" in wanted:
            files["Q4_K_M"] = quantize(ggufs["f16"], root / "model.Q4_K_M.gguf", 15, args.threads)
        params = sum(
            t.numel() for t in __import__("safetensors.torch").torch.load_file(str(ckpt / "model.safetensors")).values()
        )
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.0f}M parameters; "
            f"written in {time.perf_counter() - t0:.1f}s; {args.threads} threads; load average {loadavg()}"
        )
        engines = {}
        slots = max(1, args.concurrent)
        # room for every request at once on both runtimes: no one waits for cache, so the rows compare decoding
        blocks = slots * -(-context // 16) + 1
        kv_bytes = slots * context * 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * 2
        for v in wanted:
            runtime, _, kind = v.partition("-")
            if runtime == "engine":
                # int8/int4: weight-only quantized linears computing in bf16 (engine/quant.py), beside Q8_0/Q4_K_M
                variant = Variant.parse(kind)
                kind, compiled = variant.kind, variant.compiled
                dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(kind, "bfloat16")
                weights = kind if kind in ("int8", "int4") else None
                t_load = time.perf_counter()
                with variant.loading():
                    engines[v] = LLMEngine.from_pretrained(ckpt, EngineConfig(
                        device="cpu", dtype=dtype, quantize=weights, num_blocks=blocks,
                        compile_decode="on" if compiled else "off"))
                if compiled:
                    print(f"{v}: loaded in {time.perf_counter() - t_load:.1f} s, of which compiling "
                          f"{engines[v].runner.decode_graph.compile_seconds:.1f} s", flush=True)
            else:
                engines[v] = LlamaCppEngine(
                    files[kind],
                    max_model_len=context,
                    max_num_seqs=slots,
                    kv_cache_bytes=kv_bytes,
                    n_threads=args.threads,
                )
        prompt = (
            list(range(300, 300 + args.prompt_tokens))
            if args.vocab > 300 + args.prompt_tokens
            else [65] * args.prompt_tokens
        )
        for e in engines.values():  # warm-up: lazy initialisation and first-touch of the weights
            decode_tok_s(e, prompt, 4)
        runs: dict[str, list[float]] = {v: [] for v in engines}
        together: dict[str, list[float]] = {v: [] for v in engines}
        loads = []
        for r in range(args.repeat):
            for v, e in engines.items():
                runs[v].append(decode_tok_s(e, prompt, args.new_tokens))
                if args.concurrent > 1:
                    together[v].append(aggregate_tok_s(e, prompt, args.new_tokens, args.concurrent))
                loads.append(os.getloadavg()[0])
                more = f", {args.concurrent} together {together[v][-1]:.1f} tok/s" if together[v] else ""
                print(f"  run {r + 1} {v}: {runs[v][-1]:.1f} tok/s{more} (load {loads[-1]:.2f})", flush=True)
        base = max(runs.get("engine-fp32", [0]) or [0])
        n = args.concurrent
        print(
            f"\n| runtime | batch-1 decode tok/s (best of {args.repeat}) | all runs | x engine fp32 | "
            f"{n} requests together: tok/s, whole run (best) |"
        )
        print("|---|---|---|---|---|")
        for v, xs in runs.items():
            ratio = f"{max(xs) / base:.2f}x" if base else "-"
            agg = f"{max(together[v]):.1f}" if together[v] else "-"
            print(f"| {v} | {max(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} | {ratio} | {agg} |")
        print(f"\nload average during the runs: {min(loads):.2f}..{max(loads):.2f}; now {loadavg()}")
        for e in engines.values():
            close = getattr(e, "close", None)
            if close:
                close()
        engines.clear()
        gc.collect()
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": runs,
                    "together": together,
                    "concurrent": args.concurrent,
                    "load": loads,
                    "threads": args.threads,
                    "parameters": params,
                    "shape": {
                        k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
