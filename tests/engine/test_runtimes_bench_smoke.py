"""bench/runtimes.py at tiny shapes: every runtime row (engine fp32/bf16, llama.cpp F16, Q8_0 and
Q4_K_M made with llama.cpp's quantizer) runs and is printed, so `make bench` does not find it broken."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]


def test_runtimes_bench_prints_every_runtime(tmp_path):
    out = tmp_path / "runtimes.json"
    proc = subprocess.run(
        [sys.executable, "bench/runtimes.py", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--intermediate", "128", "--vocab", "320", "--prompt-tokens", "8", "--new-tokens", "6", "--repeat", "1",
         "--threads", "1", "--concurrent", "3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("engine-fp32", "engine-bf16", "llama.cpp-F16", "llama.cpp-Q8_0", "llama.cpp-Q4_K_M"):
        assert re.search(rf"\| {re.escape(row)} \| [0-9.]+ \| .* \| [0-9.]+ \|$", proc.stdout, re.M), proc.stdout
    assert "load average during the runs" in proc.stdout
    report = json.loads(out.read_text())
    assert all(len(v) == 1 and v[0] > 0 for v in report["runs"].values())
    assert all(len(v) == 1 and v[0] > 0 for v in report["together"].values())
