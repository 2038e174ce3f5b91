"""bench/monitor_windows.py at a low rate: the script still drives the monitor's real state, rules and
dashboard snapshot, and prints its figures next to the baseline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_monitor_windows_bench_reports_costs_window_and_error():
    proc = subprocess.run([sys.executable, "bench/monitor_windows.py", "--rates", "20", "--repeat", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(
        r"20 req/s: window holds 6,000 of 6,000 requests; alert evaluation [0-9.]+ ms, dashboard snapshot "
        r"[0-9.]+ ms; baseline: sorting the window's raw latencies [0-9.]+ ms .*largest percentile error ([0-9.]+)%",
        proc.stdout,
    )
    assert line, proc.stdout
    assert float(line.group(1)) <= 1.1
