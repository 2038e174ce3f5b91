"""A restarted monitor rebuilds the fleet from EVENTS up to its durable's ack floor, then the durable
carries on: the same state as a monitor that never stopped, counters that start at zero."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from datetime import datetime, timezone

from services.monitor.adapters.replay import ReplayPass, ReplayProgress, replay, replay_until_ack_floor
from services.monitor.domain.state import NodeState
from services.monitor.entrypoints.app import create_monitor
from services.monitor.service_layer.monitor import Monitor
from shared import subjects
from shared.events import (
    AlertFiring,
    DeployReady,
    DeployRequested,
    DeployScheduled,
    DeployUnloaded,
    InferenceCompleted,
    InferenceFailed,
    MeasuredMemory,
)
from shared.service import Service
from tests.monitor.conftest import Http, fast_config, until
from tests.monitor.script import GiB, TINY, Publisher, completed, deployments, fleet, traffic
from tests.monitor.test_metrics import samples
from tests.support.helpers import settings_for

ANOTHER = TINY.model_copy(update={"name": "another", "version": 1})


def make(nats_url: str, data_dir: Path, durable: str = "monitor") -> tuple[Service, Monitor]:
    service = create_monitor(settings_for("monitor", nats_url, data_dir), fast_config(events_durable=durable))
    return service, service.part(Monitor)


def requests(monitor: Monitor) -> list[tuple]:
    """Every second of requests the monitor holds: its counts, tokens and latency histograms."""
    return [
        (model, second, r.requests, r.failed, r.completion_tokens, r.e2e, r.ttft)
        for model, second, r in monitor.state.traffic.held()
    ]


async def firings(p: Publisher) -> int:
    """How many alert.firing events the stream holds."""
    info = await p.nc.jetstream().stream_info(subjects.EVENTS_STREAM, subjects_filter=AlertFiring.subject())
    return (info.state.subjects or {}).get(AlertFiring.subject(), 0)


def replay_over(monitor: Monitor) -> bool:
    return monitor.replay_progress.status in ("done", "first_start", "failed")


def counter_total(text: str, name: str) -> float:
    return sum(v for (n, _labels), v in samples(text).items() if n == name)


async def test_a_restarted_monitor_shows_what_a_monitor_that_never_stopped_shows(nats_server, tmp_path: Path):
    p = await Publisher.connect(nats_server.url)
    reference_service, reference = make(nats_server.url, tmp_path / "reference", durable="monitor-reference")
    async with reference_service.running():
        first_service, first = make(nats_server.url, tmp_path / "monitor")
        async with first_service.running():
            await fleet(p)
            await deployments(p)
            await traffic(p, 20)
            await until(
                lambda: (
                    first.state.traffic.count() == reference.state.traffic.count() == 21
                    and len(first.state.deployments) == 2
                ),
                "both monitors to hear the first run",
            )
            assert first.replay_progress.status == "first_start"  # no durable yet: it delivers everything
            # both monitors fire the broken deployment's alert before the first one stops (it may stop
            # before its next evaluation otherwise, and the count below would depend on timing)
            await until(lambda: first.alerts.firing() and reference.alerts.firing(), "both monitors to fire")
            for _ in range(250):
                if await firings(p) == 2:
                    break
                await asyncio.sleep(0.02)
            assert await firings(p) == 2

        # while the monitor is down: a new deployment, a change to an old one, more requests
        await p.send(DeployRequested(deployment_id="dep-another", model_ref="another"))
        await p.send(
            DeployScheduled(
                deployment_id="dep-another",
                model=ANOTHER,
                node_id="cpu-1",
                device="cpu",
                predicted_bytes=GiB,
                context_length=512,
            )
        )
        await p.send(
            DeployReady(
                deployment_id="dep-another",
                model=ANOTHER,
                node_id="cpu-1",
                device="cpu",
                measured=MeasuredMemory(weights=GiB, kv_cache=GiB, peak=2 * GiB),
                load_seconds=0.5,
            )
        )
        await p.send(DeployUnloaded(deployment_id="dep-tiny", model=TINY, node_id="gpu-1"))
        for i in range(10):  # no failure among them: the error-rate alert stays quiet
            await p.send(completed(20 + i))
        await until(lambda: reference.state.traffic.count() == 31, "the reference to hear the downtime")

        again_service, again = make(nats_server.url, tmp_path / "monitor")
        async with again_service.running():
            await until(lambda: replay_over(again), "the replay")
            progress = again.replay_progress
            assert progress.status == "done" and progress.skipped == 0
            assert progress.events >= 2 + 7 + 21  # registrations, deployments, the first run's requests
            await p.send(completed(99))  # a marker after everything: once both have it, neither has more to come
            await until(
                lambda: reference.state.traffic.count() == 32 and again.state.traffic.count() == 32,
                "both monitors to hear the marker",
            )

            assert requests(again) == requests(reference)
            assert (
                again.state.window(time.time(), again.requests_window_s()).requests == 32
            )  # 20 + 1 failed, 10, the marker: none twice, none missed
            assert again.snapshot().deployments == reference.snapshot().deployments
            states = {d.deployment_id: d.state for d in again.snapshot().deployments}
            assert states == {"dep-tiny": "unloaded", "dep-broken": "failed", "dep-another": "ready"}
            assert sorted(again.state.nodes) == ["cpu-1", "gpu-1"]
            assert (
                again.state.deployments_by_state() == reference.state.deployments_by_state()
            )  # the strata:deployments gauge

            # the broken deployment's alert, fired once by each monitor before, is not fired again by the restarted one
            assert [rule.name for rule, _ in again.alerts.firing()] == ["deploy_failed"]
            await asyncio.sleep(0.3)  # several evaluations (every 0.05 s) for a duplicate to show
            assert await firings(p) == 2  # not fired again by the restarted monitor
    await p.close()


async def test_the_counters_of_a_restarted_monitor_count_only_what_it_is_delivered(nats_server, tmp_path: Path):
    p = await Publisher.connect(nats_server.url)
    first_service, first = make(nats_server.url, tmp_path)
    async with first_service.running():
        await traffic(p, 10, spread_s=30)  # all within the dashboard's 60 s summary
        await until(lambda: first.state.traffic.count() == 11, "the first run")

    again_service, again = make(nats_server.url, tmp_path)
    async with again_service.running(), Http(again_service.http) as http:
        await until(lambda: replay_over(again), "the replay")
        assert again.state.traffic.count() == 11  # the window is back ...
        before = (await http.get("/metrics")).text
        assert counter_total(before, "strata:request_success_total") == 0  # ... the counters start at zero
        assert counter_total(before, "strata:request_failure_total") == 0
        assert counter_total(before, "strata:events_total") == 0

        for i in range(3):
            await p.send(completed(100 + i))
        await until(lambda: again.state.traffic.count() == 14, "the new requests")
        after = (await http.get("/metrics")).text
        assert counter_total(after, "strata:request_success_total") == 3
        assert counter_total(after, "strata:e2e_request_latency_seconds_count") == 3
        assert counter_total(after, "strata:request_failure_total") == 0

        state = (await http.get("/api/state")).json()
        assert state["replay"]["status"] == "done"
        assert state["replay"]["events"] == 11 and state["replay"]["durable"] == "monitor"
        assert state["replay"]["up_to_seq"] == 11 and state["replay"]["seconds"] >= 0
        assert sum(m["requests"] for m in state["models"]) == 14
    await p.close()


async def test_a_malformed_message_in_the_stream_is_skipped_by_the_replay(nats_server, tmp_path: Path, caplog):
    p = await Publisher.connect(nats_server.url)
    first_service, first = make(nats_server.url, tmp_path)
    async with first_service.running():
        await p.send(DeployRequested(deployment_id="dep-a", model_ref="a"))
        await p.nc.jetstream().publish(DeployRequested.subject(), b"{not an event", stream=subjects.EVENTS_STREAM)
        await p.send(DeployRequested(deployment_id="dep-b", model_ref="b"))
        await until(
            lambda: len(first.state.deployments) == 2 and first_service.consumer.stats.dead_lettered == 1,
            "both deployments, and the malformed one dead-lettered",
        )

    again_service, again = make(nats_server.url, tmp_path)
    with caplog.at_level(logging.WARNING, logger="services.monitor.adapters.replay"):
        async with again_service.running():
            await until(lambda: replay_over(again), "the replay")
            assert again.replay_progress.status == "done"
            # the two deployments (and the alert.firing about the dead letter, where the first monitor got to publish
            # it)
            assert again.replay_progress.skipped == 1 and again.replay_progress.events in (2, 3)
            assert sorted(again.state.deployments) == ["dep-a", "dep-b"]
            await p.send(DeployRequested(deployment_id="dep-c", model_ref="c"))  # and the durable carries on
            await until(lambda: "dep-c" in again.state.deployments, "a deployment after the restart")
    assert any("skipped malformed message" in r.getMessage() for r in caplog.records)
    await p.close()


async def test_a_replay_that_fails_says_so_and_leaves_the_monitor_running():
    class Unreachable:
        async def consumer_info(self, stream: str, durable: str):
            raise ConnectionError("no JetStream")

    progress = ReplayProgress()
    await replay_until_ack_floor(Unreachable(), subjects.EVENTS_STREAM, "monitor", [], lambda e: None, progress)  # type: ignore[arg-type]
    assert progress.status == "failed" and progress.error == "ConnectionError: no JetStream"
    assert progress.events == 0 and progress.seconds is not None


async def test_requests_are_replayed_only_from_the_windows_start_and_deployments_from_the_beginning(
    nats_server, tmp_path: Path
):
    """The plan: every rare event type from the first message, the request events from a start time
    (the stream's own clock) on; read by a real server."""
    _service, monitor = make(nats_server.url, tmp_path)
    rare, recent = monitor.replay_plan()
    assert rare.since is None and DeployRequested.subject() in rare.subjects
    assert InferenceCompleted.subject() not in rare.subjects and InferenceFailed.subject() not in rare.subjects
    assert sorted(recent.subjects) == sorted([InferenceCompleted.subject(), InferenceFailed.subject()])
    assert recent.since is not None and time.time() - recent.since.timestamp() >= monitor.requests_window_s() == 300

    p = await Publisher.connect(nats_server.url)
    await p.send(DeployRequested(deployment_id="dep-old", model_ref="a"))
    for i in range(4):
        await p.send(completed(i))
    cut = datetime.now(timezone.utc)
    for i in range(3):
        await p.send(completed(10 + i))
    await p.send(completed(20))  # after the floor: the durable's, not the replay's
    js = p.nc.jetstream()
    progress, seen = ReplayProgress(), []
    await replay(
        js,
        subjects.EVENTS_STREAM,
        8,
        [ReplayPass(rare.subjects), ReplayPass(recent.subjects, cut)],
        seen.append,
        progress,
    )
    assert [e.type for e in seen] == ["deploy.requested"] + ["inference.completed"] * 3
    assert [e.data.request_id for e in seen[1:]] == ["r10", "r11", "r12"]
    assert progress.events == 4
    assert (await js.stream_info(subjects.EVENTS_STREAM)).state.consumer_count == 0  # the replay's consumers are gone
    await p.close()


def test_a_replayed_node_counts_its_silence_from_the_restart():
    """Heartbeats are not in the stream: without this every restart would call every node silent."""
    _service, monitor = make("nats://127.0.0.1:1", Path("/nonexistent"))
    monitor.state.nodes["up"] = NodeState("up", last_seen=100.0)
    monitor.state.nodes["gone"] = NodeState("gone", last_seen=100.0, lost=True)
    monitor.clock = lambda: 1000.0
    monitor.replayed()
    assert monitor.state.nodes["up"].last_seen == 1000.0
    assert (monitor.state.nodes["gone"].last_seen, monitor.state.nodes["gone"].lost) == (100.0, True)


async def test_a_restarted_monitor_keeps_the_dead_letter_counts_and_counts_none_twice(nats_server, tmp_path: Path):
    p = await Publisher.connect(nats_server.url)
    first_service, first = make(nats_server.url, tmp_path)
    async with first_service.running():
        for service in ("model-store", "model-store", "provenance-ledger"):
            await p.dead_letter(service)
        await until(lambda: sum(first.state.dead_letter_totals.values()) == 3, "the first run's dead letters")
    await p.dead_letter("provenance-ledger")  # while the monitor is down

    again_service, again = make(nats_server.url, tmp_path)
    async with again_service.running(), Http(again_service.http) as http:
        await until(
            lambda: again.state.dead_letter_totals == {"model-store": 2, "provenance-ledger": 2}, "the counts back"
        )
        progress = again.dead_letter_replay
        assert progress.status == "done" and progress.events == 3  # read back; the fourth delivered by the durable
        state = (await http.get("/api/state")).json()
        assert state["dead_letters"] == {"model-store": 2, "provenance-ledger": 2}
        assert state["dead_letter_replay"]["events"] == 3
        metrics = (await http.get("/metrics")).text
        assert (
            counter_total(metrics, "strata:dead_letters_total") == 1
        )  # a new process's counter: only what it was delivered
        await asyncio.sleep(0.3)  # several evaluations and deliveries: nothing is counted twice
        assert again.state.dead_letter_totals == {"model-store": 2, "provenance-ledger": 2}
    await p.close()
