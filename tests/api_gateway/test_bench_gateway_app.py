"""bench/gateway_app.py at a few requests: the script still drives the real gateway app (so a change to
the gateway's internals does not leave `make bench` broken), and its two figures are printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gateway_app_bench_measures_the_app_against_the_bare_work():
    proc = subprocess.run([sys.executable, "bench/gateway_app.py", "--requests", "50", "--repeat", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(re.findall(r"^(gateway app|bare ASGI, same work) +([0-9.]+) ms CPU per request", proc.stdout, re.M))
    assert set(figures) == {"gateway app", "bare ASGI, same work"}, proc.stdout
    assert float(figures["gateway app"]) > 0 and float(figures["bare ASGI, same work"]) > 0
    assert re.search(r"^framework and middleware: [+-][0-9.]+ ms", proc.stdout, re.M), proc.stdout
