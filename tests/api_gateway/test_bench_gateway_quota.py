"""bench/gateway_quota.py at a few requests: it still drives the real metering and KV counters (so a
change to them does not leave the bench broken), and prints its three rows of figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quota_bench_measures_the_shared_counters_against_the_rules_alone():
    proc = subprocess.run([sys.executable, "bench/gateway_quota.py", "--requests", "64", "--concurrency", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(
        r"^(1 at a time|4 at once, one key|4 at once, 4 keys) .* \(\+([0-9.]+) ms wall, \+(-?[0-9.]+) ms CPU",
        proc.stdout,
        re.M,
    )
    assert [r[0] for r in rows] == ["1 at a time", "4 at once, one key", "4 at once, 4 keys"], proc.stdout
    assert all(float(wall) > 0 for _, wall, _ in rows), proc.stdout
