"""bench/engine.py at tiny shapes on CPU: every path but the CUDA-only timings runs here, so a GPU
session (docs/benchmarks.md section 5, bench/gpu.sh) does not find a broken script."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.engine_runners import decode_run
from bench.roofline import kv_bytes_per_token, percentile, weight_bytes_read_per_step
from services.inference_worker.engine.cpu_linear import can_pack
from services.inference_worker.kernels import cpu_gemv

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def test_engine_bench_prints_roofline_and_batched_rows(tmp_path):
    out_json = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "bench/engine.py", "--device", "cpu", "--threads", "1", "--hidden", "64",
         "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "256",
         "--prompt-tokens", "8", "--new-tokens", "6", "--batch-sizes", "1,4", "--repeat", "1",
         "--skip-hf", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert re.search(rf"roofline {NUMBER} tok/s", text), text
    assert re.search(rf"\| strata \| {NUMBER} \| {NUMBER}% \|", text), text
    batched = rf"\| 4 \| {NUMBER} \| {NUMBER}x \| {NUMBER} \| {NUMBER} \| {NUMBER} \| 20 \|"
    assert re.search(batched, text), text  # decode tok/s, x batch-1, ITL p50/p99, whole run, gaps
    assert "Kernel and attention tables skipped" in text  # and says why
    report = json.loads(out_json.read_text())
    rows = {r["batch"]: r for r in report["rows"]}
    assert rows[4]["itl_samples"] == 4 * 5  # 5 gaps between 6 tokens, per request
    assert rows[1]["strata_decode"] > 0 and report["roofline"]["tok_s"] > 0


@pytest.mark.parametrize("preset, says", [("moe", "4 experts top-2"), ("sliding-window", "sliding window 64")])
def test_engine_bench_presets_run_next_to_transformers(preset, says, tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/engine.py", "--preset", preset, "--device", "cpu", "--threads", "1",
         "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
         "--vocab", "256", "--experts", "4", "--new-tokens", "6", "--batch-sizes", "1,4", "--repeat", "1",
         "--skip-kernels"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout, proc.stdout
    for batch in (1, 4):  # our figure and transformers' in the same row
        assert re.search(rf"batch {batch}: strata decode {NUMBER} tok/s .*HF decode tok/s: HF eager {NUMBER}",
                         proc.stdout), proc.stdout


def test_kernel_and_attention_tables_run_with_the_references(capsys):
    """The CUDA table's code path, with the torch references standing in for the Triton kernels."""
    from bench.engine_kernels import Shapes, bench_kernels

    tiny = Shapes(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, decode_batch=2,
                  decode_ctx=64, block=16)
    rows = bench_kernels(torch.float32, 8, copy_gbs=10.0, dev="cpu", shapes=tiny, triton=False,
                         compile_=False)
    assert set(rows) >= {"rms_norm", "rope", "swiglu", "paged_decode_attention", "attention_vs_sdpa"}
    att = rows["attention_vs_sdpa"]
    for case in ("equal", "spread"):  # the paged reference and SDPA on the contiguous copy agree
        assert att[case]["rel_err"] < 1e-5
        assert att[case]["paged_gbs"] > 0 and att[case]["sdpa_gbs"] > 0
    assert "SDPA contiguous" in capsys.readouterr().out


def test_weight_bytes_skip_the_embedding_unless_tied():
    class Tiny(nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4, bias=False)
            self.lm_head = nn.Linear(4, 10, bias=False)
            if tied:
                self.lm_head.weight = self.embed.weight

    untied, embed = weight_bytes_read_per_step(Tiny(False), tied_embeddings=False)
    assert (untied, embed) == ((16 + 40) * 4, 40 * 4)
    tied, _ = weight_bytes_read_per_step(Tiny(True), tied_embeddings=True)
    assert tied == (40 + 16) * 4  # the shared table counts once
    assert kv_bytes_per_token(32, 8, 128, 2) == 128 * 1024  # Llama-3-8B bf16


def test_decode_rate_starts_after_every_first_token():
    # two requests; the second's first token arrives at t=2: decode time is 2..4, tokens after t=2
    run = decode_run(2, 3, wall=4.0, stamps=[[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    assert run.decode_tok_s == pytest.approx(3 / 2.0)  # 3.0, 3.0, 4.0 in 2 s
    assert sorted(run.gaps_s) == [1.0, 1.0, 1.0, 1.0]
    assert run.whole_tok_s == pytest.approx(6 / 4.0)
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_dtype_bench_prints_a_row_per_variant_and_the_llama_cpp_hook(tmp_path):
    """bench/engine_dtypes.py (#24) at a tiny shape: one row per dtype / quantization, the fixed overhead
    column, and the llama.cpp rows saying they were not measured rather than a number."""
    out_json = tmp_path / "dtypes.json"
    proc = subprocess.run(
        [sys.executable, "bench/engine_dtypes.py", "--shape", "--hidden 64 --layers 2 --heads 4 --kv-heads 2 "
         "--intermediate 128 --vocab 256", "--variants", "bf16,int8,int4", "--rounds", "1", "--threads", "1",
         "--prompt-tokens", "8", "--new-tokens", "4", "--concurrent", "2", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant, dtype in (
        ("bf16", "bfloat16"),
        ("int8", "bfloat16 \\+ int8 weights"),
        ("int4", "bfloat16 \\+ int4 weights"),
    ):
        assert re.search(
            rf"\| Strata {variant} \| {dtype} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| -?{NUMBER} \|", proc.stdout
        ), proc.stdout
    assert "| llama.cpp Q8_0 | | not measured" in proc.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert rows["int8"]["bytes_per_step"] < rows["bf16"]["bytes_per_step"] and rows["llama.cpp F16"] is None


def test_grammar_bench_prints_a_row_per_batch_size():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/grammar.py",
            "--vocab",
            "400",
            "--hidden",
            "64",
            "--layers",
            "1",
            "--batch-sizes",
            "1,3",
            "--new-tokens",
            "4",
            "--rounds",
            "1",
            "--max-files",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for batch in (1, 3):  # free and guided ms/step, overhead, the mask alone in ms and per row
        assert re.search(
            rf"^\s+{batch}\s+{NUMBER}\s+{NUMBER}\s+-?{NUMBER}%\s+{NUMBER}\s+{NUMBER}$", proc.stdout, re.M
        ), proc.stdout
    assert "load average before" in proc.stdout and "load average after" in proc.stdout


def test_cpu_linear_bench_prints_every_way_at_every_row_count():
    proc = subprocess.run(
        [sys.executable, "bench/cpu_linear.py", "--n", "64", "--k", "32", "--mb", "1", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ways = ["bf16 plain", "fp16 plain", "fp32 plain", "int8 torch (_weight_int8pack_mm)"] + [
        name
        for dt, name in ((torch.bfloat16, "bf16 prepacked (oneDNN)"), (torch.float16, "fp16 prepacked (fbgemm)"))
        if can_pack(dt)
    ]
    if cpu_gemv.unavailable() is None:
        ways += ["bf16 our loop (cpu_gemv)", "int8 our loop (cpu_gemv)"]
        if cpu_gemv.amx():
            ways += ["bf16 our loop, AVX-512 only", "int8 our loop, AVX-512 only"]
    for way in ways:
        assert re.search(
            rf"\| {re.escape(way)} \| {NUMBER} \({NUMBER} %\) \| {NUMBER} \({NUMBER} %\) \| {NUMBER} \({NUMBER} %\) \|",
            proc.stdout,
        ), proc.stdout
