"""Where a CPU decode step's fixed overhead goes (issue #24), and one cut measured A/B.

A random-weight Llama with the issue's layer and head counts (16 layers, 16/8 heads; hidden 512 by
default, so the matmuls are small and the small ops show), bf16, one torch thread:
- A/B: median batch-1 decode step with the paged-attention plan (gather indices and mask) made once per
  step, as the engine does now (kernels/paged_attention.py ``_plan``), against once per layer, as before;
  6 rounds of 16 steps, alternating;
- the number of aten ops one decode step runs (torch profiler, nested ops included), both ways;
- the profile of one step, by self CPU time;
- with ``--compile``: instead, the model's forward under ``torch.compile(dynamic=True)`` (inductor, CPU)
  against eager: the compile time (first steps) and the median decode step, alternating (the first try,
  before engine/compiled_decode.py);
- with ``--compiled-rows 1,2,4,8``: instead, the engine's compiled decode step (EngineConfig.compile_decode,
  its row cap lifted) against an eager engine on the same checkpoint: the median decode step at each number
  of rows, alternating, the load printed; the figures behind CompiledDecode.MAX_ROWS.

    python bench/decode_overhead.py [--hidden 1024 --intermediate 2816 --vocab 32000] [--compiled-rows 1,2,4,8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.engine import make_checkpoint, parse_args  # noqa: E402
from bench.host import loadavg  # noqa: E402
from services.inference_worker.api import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
import services.inference_worker.kernels.paged_attention as pa  # noqa: E402
from services.inference_worker.engine.compiled_decode import CompiledDecode  # noqa: E402

PLANS = {"plan per layer (before)": pa._make_plan, "plan per step (now)": pa._plan}


def decode_steps_ms(eng: LLMEngine, n: int = 16, rows: int = 1) -> float:
    for r in range(rows):
        eng.add_request(list(range(3 + r, 35 + r)), SamplingParams(max_tokens=n + 2, temperature=0, ignore_eos=True))
    eng.step()  # the prefill
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    while eng.has_unfinished():
        eng.step()
    return 1e3 * statistics.median(times)


def profile_step(eng: LLMEngine):
    eng.add_request(list(range(3, 35)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    eng.step()
    eng.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eng.step()
    while eng.has_unfinished():
        eng.step()
    return prof.key_averages()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="512")
    ap.add_argument("--intermediate", default="1408")
    ap.add_argument("--vocab", default="8192")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="torch.compile of the forward against eager")
    ap.add_argument("--compiled-rows", help="e.g. 1,2,4,8: the compiled decode step against eager at these rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = parse_args(["--hidden", args.hidden, "--layers", "16", "--heads", "16", "--kv-heads", "8",
                        "--intermediate", args.intermediate, "--vocab", args.vocab])
    path, _, _ = make_checkpoint(shape, Path(tempfile.mkdtemp(prefix="strata-overhead-")), "cpu", torch.bfloat16)
    if args.compiled_rows:
        return compiled_rows_ab(path, [int(r) for r in args.compiled_rows.split(",")], args.rounds, args.hidden)
    eng = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="bfloat16", num_blocks=64))
    print(f"load {loadavg()}; hidden {args.hidden}, 16 layers, 16/8 heads, bf16, 1 thread")
    if args.compile:
        return compile_ab(eng, args.rounds)
    steps: dict[str, list[float]] = {name: [] for name in PLANS}
    original = pa._plan
    try:
        for _ in range(args.rounds):
            for name, plan in PLANS.items():
                pa._plan = plan
                steps[name].append(decode_steps_ms(eng))
        for name, plan in PLANS.items():
            pa._plan = plan
            events = profile_step(eng)
            ops = sum(e.count for e in events if e.key.startswith("aten::"))
            print(f"{name}: median decode step {statistics.median(steps[name]):.2f} ms "
                  f"(rounds: {', '.join(f'{x:.1f}' for x in steps[name])}); {ops} aten ops a step")
    finally:
        pa._plan = original
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"load {loadavg()}")


def compile_ab(eng: LLMEngine, rounds: int) -> None:
    model = eng.runner.model
    eager = model.forward
    compiled = torch.compile(eager, dynamic=True)
    model.forward = compiled  # nn.Module.__call__ calls the instance's forward
    t0 = time.perf_counter()
    decode_steps_ms(eng, 4)
    print(f"compile + first 4 steps: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    decode_steps_ms(eng, 4)
    print(f"the next 4 steps (recompiles for new shapes included): {time.perf_counter() - t0:.1f} s")
    steps: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for name, forward in (("eager", eager), ("compiled", compiled)):
            model.forward = forward
            steps[name].append(decode_steps_ms(eng))
    for name, v in steps.items():
        print(f"{name}: median decode step {statistics.median(v):.2f} ms ({', '.join(f'{x:.1f}' for x in v)})")
    print(f"load {loadavg()}")


def compiled_rows_ab(path, rows: list[int], rounds: int, hidden: str) -> None:
    CompiledDecode.MAX_ROWS = max(rows)  # every batch compiled, to find where it stops paying
    engines = {mode: LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="bfloat16", num_blocks=128,
                                                                  compile_decode=mode))
               for mode in ("off", "on")}
    print(f"load {loadavg()}; hidden {hidden}, 16 layers, 16/8 heads, bf16, 1 thread; compiled in "
          f"{engines['on'].runner.decode_graph.compile_seconds:.1f} s; median decode step ms, {rounds} rounds x 12 "
          "steps, alternating")
    print("| rows | eager ms | compiled ms | eager / compiled |\n|---|---|---|---|")
    for n in rows:
        steps: dict[str, list[float]] = {mode: [] for mode in engines}
        for _ in range(rounds):
            for mode, eng in engines.items():
                steps[mode].append(decode_steps_ms(eng, 12, n))
        eager, compiled = statistics.median(steps["off"]), statistics.median(steps["on"])
        print(f"| {n} | {eager:.1f} | {compiled:.1f} | {eager / compiled:.2f}x |", flush=True)
    print(f"load {loadavg()}")


if __name__ == "__main__":
    main()
