"""The monitor's request windows at a given request rate: what one alert evaluation and one dashboard
snapshot cost (the monitor does each once a second), how many requests a 300 s window holds, and how
far its percentiles are from exact ones.

Baseline, same run: the exact nearest-rank p50/p95/p99 of the same window's latencies, kept as a
list and sorted (what the monitor did before traffic.py, which also capped the list at 50,000).

    .venv/bin/python bench/monitor_windows.py --rates 100,2000      # ~1 minute
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.monitor.api import AlertEngine, FleetState, MonitorConfig, Traffic, load_rules, snapshot  # noqa: E402

WINDOW_S = 300.0
NOW = 1_000_000.0


def exact(ordered: list[float], q: float) -> float:
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def cpu_ms(step, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        step()
    return (time.process_time() - start) / n * 1e3


def run(rate: int, repeat: int) -> None:
    rng = random.Random(rate)
    state = FleetState(traffic=Traffic(WINDOW_S + 60, clock=lambda: NOW))
    latencies: list[float] = []
    for second in range(int(WINDOW_S)):
        for i in range(rate):
            e2e = rng.lognormvariate(-1.0, 0.8)
            state.traffic.record("model", NOW - WINDOW_S + second + i / rate, True, e2e, e2e / 10, 20)
            latencies.append(e2e)
    config = MonitorConfig()
    engine = AlertEngine(load_rules(config.rules_file))
    evaluate = cpu_ms(lambda: engine.evaluate(state, NOW), repeat)
    push = cpu_ms(lambda: snapshot(state, engine, NOW, config.history_s, config.bucket_s), repeat)
    window = state.window(NOW, WINDOW_S, "model")
    ordered: list[float] = []
    baseline = cpu_ms(lambda: ordered.__init__(sorted(latencies)), repeat)  # the sort alone, per percentile query
    error = max(abs(window.e2e_percentile(q) / exact(ordered, q) - 1) for q in (50, 95, 99))
    print(f"{rate:>6} req/s: window holds {window.requests:,} of {len(latencies):,} requests; "
          f"alert evaluation {evaluate:.1f} ms, dashboard snapshot {push:.1f} ms; "
          f"baseline: sorting the window's raw latencies {baseline:.1f} ms (per percentile query); "
          f"largest percentile error {error:.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,2000", help="requests per second, comma-separated")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    for rate in (int(r) for r in args.rates.split(",")):
        run(rate, args.repeat)


if __name__ == "__main__":
    main()
