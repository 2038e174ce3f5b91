"""The request windows (services/monitor/domain/traffic.py): plain Python, no NATS."""

from __future__ import annotations

import math
import random

import pytest

from services.monitor.domain.state import FleetState
from services.monitor.domain.traffic import Latencies, Rollup, Traffic


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@pytest.mark.parametrize("q", [1, 50, 90, 95, 99, 100])
def test_a_percentile_is_within_1_1_percent_of_the_exact_nearest_rank_value(q):
    rng = random.Random(q)
    values = [rng.lognormvariate(-1.0, 1.5) for _ in range(5_000)] + [0.0, 1e-9, 250.0]
    latencies = Latencies()
    for v in values:
        latencies.add(v)
    want, got = exact(values, q), latencies.percentile(q)
    assert got == pytest.approx(want, rel=0.011, abs=1e-6)


def test_identical_latencies_give_that_value_exactly_and_none_give_nan():
    latencies = Latencies()
    assert math.isnan(latencies.percentile(50))
    for _ in range(7):
        latencies.add(3.0)
    assert latencies.percentile(50) == latencies.percentile(99) == 3.0


def test_an_infinite_or_negative_latency_is_binned_not_raised():
    latencies = Latencies()
    for v in (math.inf, -1.0, 0.5):
        latencies.add(v)
    assert latencies.percentile(1) == 0.0 and latencies.percentile(50) == pytest.approx(0.5, rel=0.011)
    assert latencies.percentile(100) == pytest.approx(1e9, rel=0.011)


def test_a_rollup_counts_failures_apart_from_the_latencies_of_the_successful():
    rollup = Rollup()
    rollup.record(True, 0.5, 0.1, completion_tokens=10)
    rollup.record(False, 9.0)
    assert (rollup.requests, rollup.failed, rollup.ok, rollup.completion_tokens) == (2, 1, 1, 10)
    assert rollup.e2e_percentile(100) == 0.5 and rollup.ttft_percentile(50) == 0.1


def test_a_window_holds_the_whole_seconds_it_spans_and_one_model_or_all():
    traffic = Traffic(horizon_s=600, clock=lambda: 1100.0)
    for second in range(1000, 1100):
        traffic.record("a", second + 0.5, True, 0.2)
        traffic.record("b", second + 0.5, second % 10 != 0, 0.4)
    assert traffic.window(1099.9, 10, "a").requests == 11  # seconds 1089..1099
    assert traffic.window(1099.9, 10, "b").failed == 1  # second 1090
    assert traffic.window(1099.9, 10).requests == 22
    assert traffic.window(1099.9, 1000).requests == 200
    assert traffic.window(2000, 10).requests == 0


def test_a_busy_models_window_covers_its_whole_length_in_bounded_memory():
    """2,000 requests a second for 10 minutes: a 300 s window holds all 600,000 of its requests (the
    first design held the last 50,000: 25 s), and no more than the horizon's seconds are kept."""
    now = [0.0]
    traffic = Traffic(horizon_s=360, clock=lambda: now[0])
    for second in range(600):
        for i in range(2_000):
            now[0] = second + i / 2_000
            traffic.record("busy", now[0], True, 0.1 + (i % 100) / 1_000)
    window = traffic.window(599.999, 300, "busy")
    assert window.requests == 301 * 2_000  # seconds 299..599
    assert window.e2e_percentile(50) == pytest.approx(0.15, rel=0.011)
    assert len(traffic.held()) <= 360 + 61


def test_requests_older_than_the_horizon_are_not_kept_and_idle_models_are_forgotten():
    now = [10.0]
    traffic = Traffic(horizon_s=100, clock=lambda: now[0])
    traffic.record("old", 10.0, True, 1.0)
    for second in range(200, 400):
        now[0] = second
        traffic.record("new", second, True, 1.0)
    traffic.record("new", 150.0, True, 1.0)  # a replayed request from before the horizon: not kept
    assert traffic.models() == {"new"}
    assert traffic.window(399, 1000, "new").requests <= 161


def test_one_request_stamped_far_in_the_future_does_not_hide_the_others():
    traffic = Traffic(horizon_s=300, clock=lambda: 1_000.0)
    traffic.record("m", 4_000_000_000.0, True, 1.0)  # a publisher's clock in the next century
    for second in range(990, 1000):
        traffic.record("m", second, True, 1.0)
    # the ten, and the future one (at or after the window's start)
    assert traffic.window(1_000.0, 60, "m").requests == 11


def test_the_fleet_state_names_models_with_traffic_or_deployments():
    state = FleetState(traffic=Traffic(horizon_s=60, clock=lambda: 5.0))
    state.traffic.record("served", 5.0, True, 0.3)
    assert state.models() == ["served"]
    assert state.window(5.5, 60, "served").ok == 1


def test_a_window_built_from_blocks_and_seconds_equals_the_sum_of_its_seconds():
    rng = random.Random(7)
    traffic = Traffic(horizon_s=400, clock=lambda: 1300.0)
    for _ in range(3_000):
        traffic.record(rng.choice("xy"), rng.uniform(1000, 1300), rng.random() > 0.1, rng.uniform(0.01, 5), 0.01, 3)
    for _ in range(50):
        now, seconds = rng.uniform(1000, 1400), rng.uniform(1, 400)
        since = math.floor(now - seconds)
        want = Rollup()
        for model, second, rollup in traffic.held():
            if model == "x" and second >= since:
                want.merge(rollup)
        got = traffic.window(now, seconds, "x")
        assert (got.requests, got.failed, got.completion_tokens, got.e2e, got.ttft) == (
            want.requests,
            want.failed,
            want.completion_tokens,
            want.e2e,
            want.ttft,
        )
