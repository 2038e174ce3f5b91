"""Issue #24's rows: the Strata engine per dtype and weight-only quantization on one model, in one run.

    python bench/engine_dtypes.py                       # the issue's 254M-param Llama shape, bf16 checkpoint
    python bench/engine_dtypes.py --variants bf16,int8 --rounds 3

For each variant (fp32, fp16, bf16: explicit dtypes; bf16-plain: bf16 without the oneDNN prepacking of
engine/cpu_linear.py, the code before it; auto: what a deploy without a dtype gets, the
node's fastest 16-bit dtype; int8: weight-only int8 linears with bf16 activations; any NAME-nogemv: the same
without kernels/cpu_gemv.py, so torch's kernels (oneDNN prepacked bf16, ``_weight_int8pack_mm``) serve the
decode products, the code before it; any NAME-compiled (after -nogemv): the same with the compiled decode
step of engine/compiled_decode.py, compiled at load, the seconds printed):
- batch-1 decode tok/s (bench/engine_runners.StrataBench: per-token host stamps after the prefill);
- share of bandwidth: bytes one decode step reads (weights as stored, int8 included, plus the KV cache
  at the mean context) x tok/s / the copy bandwidth measured in the same run (bench/roofline.py);
- aggregate tok/s of 8 concurrent requests, prefill included (tokens / wall time of the whole call);
- per-step fixed overhead: a batch-1 decode step's time (``engine.step()``) minus its matmul time, the
  latter measured by calling every linear of the model (q/k/v, o, gate/up, down, the output head) on one
  row in layer order, nothing else; the two are timed alternately, 16 pairs, medians, so that both see
  the same load. It is everything a step does besides the weight products: attention, norms, RoPE,
  sampling, scheduling and Python.
Each figure is the median over --rounds rounds; the variants alternate within a round.

llama.cpp: ``--llama-bench PATH --gguf NAME=FILE`` (repeatable) runs llama.cpp's own ``llama-bench``
(text generation, batch 1) on GGUF files of the same model and prints its rows beside ours. Not run
here: llama.cpp is not installed on this machine, so the rows say "not measured" (this hook is untested).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.engine import make_checkpoint, parse_args as engine_args  # noqa: E402
from bench.engine_runners import StrataBench, Variant  # noqa: E402
from bench.host import loadavg  # noqa: E402
from bench.roofline import copy_bandwidth_gbs, kv_bytes_per_token, weight_bytes_read_per_step  # noqa: E402
import services.inference_worker.engine.cpu_linear as cpu_linear  # noqa: E402

# the shape: 254M parameters (hidden 1024, 16 layers, 16/8 heads, vocab 32000)
SHAPE = ["--hidden", "1024", "--layers", "16", "--heads", "16", "--kv-heads", "8", "--intermediate", "2816",
         "--vocab", "32000", "--max-position", "2048"]
VARIANTS = {"fp32": ("float32", None), "fp16": ("float16", None), "bf16": ("bfloat16", None),
            "bf16-plain": ("bfloat16", None), "auto": (None, None), "int8": (None, "int8"), "int4": (None, "int4")}
UNPACKED = {"bf16-plain"}  # bf16 with plain F.linear weights: engine/cpu_linear.py's prepacking turned off


@contextlib.contextmanager
def prepacking(on: bool):
    """Load with or without engine/cpu_linear.py's oneDNN prepacking of the bf16 linears."""
    saved = cpu_linear.can_pack
    if not on:
        cpu_linear.can_pack = lambda dtype: False
    try:
        yield
    finally:
        cpu_linear.can_pack = saved


def step_and_matmul_ms(bench: StrataBench, prompt: list[int], steps: int = 16) -> tuple[float, float]:
    """(median ms of a batch-1 decode step, median ms of its linears alone), timed alternately."""
    eng = bench.engine
    eng.add_request(prompt, bench.params.__class__(max_tokens=steps + 2, temperature=0, ignore_eos=True))
    eng.step()  # the prefill
    linears = linears_once(eng.ckpt.model)
    step_t, mm_t = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        t1 = time.perf_counter()
        linears()
        step_t.append(t1 - t0)
        mm_t.append(time.perf_counter() - t1)
    while eng.has_unfinished():
        eng.step()
    return 1e3 * statistics.median(step_t), 1e3 * statistics.median(mm_t)


def linears_once(model: nn.Module):
    """A function that puts one row through every linear of the model in layer order, and the head."""
    from services.inference_worker.engine.quant import MODULES

    kinds = (nn.Linear, cpu_linear.PackedLinear, *MODULES.values())
    linears = [m for m in model.modules() if isinstance(m, kinds) and not _router(m, model)]
    head = model.embed.weight if model.lm_head is None else None  # tied: compute_logits reads the embedding
    dtype = model.norm.dtype
    xs = [torch.randn(1, m.in_features, dtype=dtype) for m in linears]
    hidden = torch.randn(1, model.cfg.hidden_size, dtype=dtype)

    def once():
        for m, x in zip(linears, xs):
            m(x)
        if head is not None:
            torch.nn.functional.linear(hidden, head)

    once()
    return once


def _router(m: nn.Module, model: nn.Module) -> bool:
    return any(getattr(sub, "router", None) is m for sub in model.modules())


def llama_cpp_rows(args) -> dict[str, float | None]:
    """llama.cpp's batch-1 generation tok/s per GGUF (``llama-bench -p 0 -n N -o json``); None each
    when llama.cpp is not given. The hook for the baseline of issue #24; untested here."""
    rows: dict[str, float | None] = {name: None for name in ("F16", "Q8_0", "Q4_K_M")}
    if not args.llama_bench:
        return rows
    for spec in args.gguf:
        name, _, file = spec.partition("=")
        out = subprocess.run([args.llama_bench, "-m", file, "-p", "0", "-n", str(args.new_tokens),
                              "-t", str(torch.get_num_threads()), "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        rows[name] = float(json.loads(out)[0]["avg_ts"])
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="fp32,fp16,bf16,auto,int8,int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="bench/engine.py's default small shape instead")
    ap.add_argument("--shape", help="bench/engine.py's shape flags instead, e.g. '--hidden 64 --layers 2'")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (the baseline rows)")
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE", help="e.g. Q8_0=model-q8_0.gguf")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# engine dtypes and quantization (issue #24); load {loadavg()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    copy_gbs, how = copy_bandwidth_gbs("cpu")
    print(f"bandwidth: {copy_gbs:.1f} GB/s ({how})", flush=True)
    shape = engine_args(args.shape.split() if args.shape else [] if args.small else SHAPE)
    root = Path(tempfile.mkdtemp(prefix="strata-dtypes-"))
    path, model, _ = make_checkpoint(shape, root, "cpu", torch.bfloat16)
    del model
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape.vocab, (args.concurrent, args.prompt_tokens), generator=g).tolist()
    names = args.variants.split(",")
    benches = {}
    for name in names:
        variant = Variant.parse(name)
        base, compiled = variant.kind, variant.compiled
        dtype, quantize = VARIANTS[base]
        t0 = time.perf_counter()
        with prepacking(base not in UNPACKED), variant.loading():
            benches[name] = StrataBench(path, "cpu", dtype, args.concurrent, args.prompt_tokens, args.new_tokens,
                                        quantize=quantize, compile_decode="on" if compiled else "off")
        if compiled:
            print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s, of which compiling "
                  f"{benches[name].engine.runner.decode_graph.compile_seconds:.1f} s", flush=True)
        benches[name].warm(prompts[:1])
    keys = ("tok_s", "agg_tok_s", "step_ms", "matmul_ms")
    figures: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    for r in range(args.rounds):
        for name in names:  # alternating: the machine's noise falls on every variant alike
            b = benches[name]
            figures[name]["tok_s"].append(b.run(prompts[:1]).decode_tok_s)
            figures[name]["agg_tok_s"].append(b.run(prompts).whole_tok_s)
            step, mm = step_and_matmul_ms(b, prompts[0])
            figures[name]["step_ms"].append(step)
            figures[name]["matmul_ms"].append(mm)
        print(f"round {r + 1}/{args.rounds} done; load {loadavg()}", flush=True)
    cfg = benches[names[0]].engine.model_config
    report = {"load": loadavg(), "copy_gbs": copy_gbs, "rows": {}}
    print(
        f"\nmodel{' (--shape)' if args.shape else ''}: Llama hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"heads {cfg.num_heads}/{cfg.num_kv_heads}, "
        f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size} (random weights, bf16 checkpoint); "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens; median of {args.rounds} rounds"
    )
    print(
        "| variant | dtype | batch-1 tok/s | step ms | its matmuls ms | fixed overhead ms | bytes/step MB "
        "| share of bandwidth "
        f"| aggregate tok/s at {args.concurrent} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        eng, f = benches[name].engine, figures[name]
        tok_s, agg, step_ms, mm = (statistics.median(f[k]) for k in keys)
        weights, _ = weight_bytes_read_per_step(eng.ckpt.model, cfg.tie_word_embeddings)
        elem = torch.empty((), dtype=eng.dtype).element_size()
        kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, elem) * (
            args.prompt_tokens + args.new_tokens // 2
        )
        share = (weights + kv) * tok_s / (copy_gbs * 1e9)
        row = dict(
            dtype=str(eng.dtype).removeprefix("torch."),
            quantize=eng.ecfg.quantize,
            tok_s=tok_s,
            step_ms=step_ms,
            matmul_ms=mm,
            overhead_ms=step_ms - mm,
            bytes_per_step=weights + kv,
            share=share,
            agg_tok_s=agg,
        )
        report["rows"][name] = row
        print(
            f"| Strata {name} | {row['dtype']}{' + ' + row['quantize'] + ' weights' if row['quantize'] else ''} "
            f"| {tok_s:.1f} | {step_ms:.1f} "
            f"| {mm:.1f} | {step_ms - mm:.1f} | {(weights + kv) / 1e6:.0f} | {100 * share:.0f} % | {agg:.1f} |"
        )
    for gguf, rate in llama_cpp_rows(args).items():
        report["rows"][f"llama.cpp {gguf}"] = rate
        print(
            f"| llama.cpp {gguf} | "
            f"| {'not measured (llama.cpp not installed here)' if rate is None else f'{rate:.1f}'} "
            "| | | | | | |"
        )
    print(f"load at the end: {loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
