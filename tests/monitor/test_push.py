"""The dashboard stream's snapshot is built once per push interval, however many dashboards watch."""

from __future__ import annotations

import json
import math
import time

from services.monitor.config import MonitorConfig
from services.monitor.adapters.rules_file import load_rules
from services.monitor.service_layer.monitor import Monitor
from shared.events import Source, make_event
from tests.monitor.script import completed


async def test_one_snapshot_a_push_interval_and_a_fresh_one_in_the_next():
    now = [math.floor(time.time()) + 0.1]  # the event below is stamped with the wall clock

    async def publish(_data) -> None:
        return None

    config = MonitorConfig(push_every_s=1.0)
    monitor = Monitor(config, load_rules(config.rules_file), publish, clock=lambda: now[0])
    built = []
    monitor.snapshot = lambda: built.append(now[0]) or Monitor.snapshot(monitor)  # type: ignore[method-assign]

    first = monitor.pushed_snapshot()
    await monitor.on_event(make_event(completed(1), Source(service="t", node="n")))
    now[0] += 0.5
    assert [monitor.pushed_snapshot() for _ in range(5)] == [first] * 5  # five viewers, the same tick: built once
    assert len(built) == 1
    now[0] += 0.6  # the next interval: the request is in
    assert monitor.pushed_snapshot() != first and len(built) == 2
    assert sum(m["requests"] for m in json.loads(monitor.pushed_snapshot())["models"]) == 1
