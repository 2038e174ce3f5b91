"""The event backbone against a real nats-server: streams, duplicates, redelivery, dead letters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError
from opentelemetry import trace

from shared import bus, pull, subjects
from shared.events import (
    DeadLetter,
    DeployReady,
    DeployRejected,
    DeployRequested,
    Event,
    MeasuredMemory,
    ModelId,
    Source,
    make_event,
    parse_event,
)
from shared.service import Service
from tests.support.helpers import eventually, settings_for

SOURCE = Source(service="tests", node="node-t")
# 1: one fetch per event; 16: a batch fetched at once and handled in order (the monitor's way)
BATCH_SIZES = pytest.mark.parametrize("batch_size", [1, 16])


def make_service(nats_url: str, tmp_path: Path, name: str = "hardware-inventory") -> Service:
    """A bare service (no reactions of its own), so each test registers the handlers it needs."""
    return Service(name, settings_for(name, nats_url, tmp_path))


async def dead_letters(js) -> list[DeadLetter]:
    info = await js.stream_info(subjects.DEADLETTER_STREAM)
    return [
        DeadLetter.model_validate_json((await js.get_msg(subjects.DEADLETTER_STREAM, seq)).data)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]


@pytest.fixture
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


async def test_envelope_round_trip_through_jetstream_with_msg_id_and_trace_context(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    async with service.running():
        with trace.get_tracer("tests").start_as_current_span("request") as span:
            event = await service.publish(
                DeployRejected(deployment_id="d1", model_ref="tiny@prod", reason="no node fits")
            )
    stored = await js.get_msg(subjects.EVENTS_STREAM, 1)
    assert stored.subject == "evt.deploy.rejected"
    assert parse_event(stored.data, stored.subject) == event
    assert stored.headers["Nats-Msg-Id"] == event.id
    trace_id = stored.headers["traceparent"].split("-")[1]
    assert trace_id == format(span.get_span_context().trace_id, "032x")


async def test_a_service_publishes_only_its_own_event_types(nats_server, tmp_path):
    service = make_service(nats_server.url, tmp_path)
    async with service.running():
        with pytest.raises(
            PermissionError, match="hardware-inventory may not publish deploy.ready: only inference-worker does"
        ):
            await service.publish(
                DeployReady(
                    deployment_id="d",
                    model=ModelId(name="m", version=1, digest="x"),
                    node_id="n",
                    device="cpu",
                    load_seconds=1,
                    measured=MeasuredMemory(weights=1, kv_cache=1, peak=2),
                )
            )


async def test_a_duplicate_publish_is_stored_once(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    event = make_event(DeployRequested(model_ref="tiny"), SOURCE)
    async with service.running():
        first = await bus.publish(service.broker, event)
        again = await bus.publish(service.broker, event)
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert (await js.stream_info(subjects.EVENTS_STREAM)).state.messages == 1


async def test_a_publish_rides_out_a_stream_that_is_briefly_unavailable(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    event = make_event(DeployRequested(model_ref="tiny"), SOURCE)
    async with service.running():
        await js.delete_stream(subjects.EVENTS_STREAM)  # as while a clustered stream has no leader
        publishing = asyncio.create_task(bus.publish(service.broker, event))
        await asyncio.sleep(0.5)
        assert not publishing.done()
        await bus.ensure_streams(js)
        ack = await asyncio.wait_for(publishing, 10)
    assert ack.stream == subjects.EVENTS_STREAM and not ack.duplicate
    stored = await js.get_msg(subjects.EVENTS_STREAM, ack.seq)
    assert parse_event(stored.data, stored.subject) == event


async def test_a_plain_nats_publish_rides_out_the_same(js):
    """The CLI publishes through a plain nats-py connection (bus.publish_js) with the same retries."""
    event = make_event(DeployRequested(model_ref="tiny"), SOURCE)
    await js.delete_stream(subjects.EVENTS_STREAM)
    publishing = asyncio.create_task(bus.publish_js(js, event))
    await asyncio.sleep(0.5)
    assert not publishing.done()
    await bus.ensure_streams(js)
    ack = await asyncio.wait_for(publishing, 10)
    again = await bus.publish_js(js, event)
    assert again.duplicate and again.seq == ack.seq
    assert parse_event((await js.get_msg(subjects.EVENTS_STREAM, ack.seq)).data, event.subject) == event


async def test_a_publish_that_never_finds_its_stream_fails_with_the_cause(nats_server, tmp_path, js, monkeypatch):
    monkeypatch.setattr(bus, "RETRY_DELAYS_S", (0.05, 0.05))
    service = make_service(nats_server.url, tmp_path)
    async with service.running():
        await js.delete_stream(subjects.EVENTS_STREAM)
        with pytest.raises(NoStreamResponseError):
            await bus.publish(service.broker, make_event(DeployRequested(model_ref="tiny"), SOURCE))


async def test_a_service_start_leaves_streams_alone_and_provisioning_repairs_a_changed_config(js):
    """A service only makes sure EVENTS exists (its NATS user may not change it); `strata up`'s
    provisioning, as the bootstrap credential, brings it back to the platform's config."""
    from cli.provision import provision

    await js.update_stream(
        StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_ALL], duplicate_window=1.0)
    )
    await bus.ensure_streams(js)
    assert (await js.stream_info(subjects.EVENTS_STREAM)).config.duplicate_window == 1.0
    await provision(js)
    await provision(js)
    info = await js.stream_info(subjects.EVENTS_STREAM)
    assert info.config.duplicate_window == bus.DUPLICATE_WINDOW_S
    assert info.config.storage == "file"


@BATCH_SIZES
async def test_malformed_events_are_dead_lettered_with_reason_and_consuming_goes_on(
    batch_size, nats_server, tmp_path, js
):
    service = make_service(nats_server.url, tmp_path)
    seen: list[Event] = []
    service.consume("evt.deploy.>", batch_size=batch_size).on(DeployRequested)(lambda e: _record(seen, e))
    good = make_event(DeployRequested(model_ref="tiny"), SOURCE)
    async with service.running():
        await js.publish("evt.deploy.requested", b"\x00\xffnot json", headers={"Nats-Msg-Id": "garbage-1"})
        bad_data = json.loads(good.to_bytes())
        bad_data["data"]["replicas"] = -3
        bad_data["id"] = "bad-data-1"
        await js.publish("evt.deploy.requested", json.dumps(bad_data).encode())
        await js.publish("evt.deploy.requested", good.to_bytes())
        await eventually(lambda: seen, what="the valid event")
        await eventually(lambda: service.consumer.stats.dead_lettered == 2, what="two dead letters")
    assert seen == ["tiny"]
    letters = await dead_letters(js)
    assert [letter.subject for letter in letters] == ["evt.deploy.requested"] * 2
    assert letters[0].reason.startswith("invalid envelope") and letters[0].service == "hardware-inventory"
    assert "data.replicas" not in letters[1].reason and "replicas" in letters[1].reason
    assert letters[1].payload == json.dumps(bad_data)  # the original bytes are kept, nothing lost
    assert all(letter.deliveries == 1 for letter in letters)  # garbage is not retried


@BATCH_SIZES
async def test_a_failing_handler_is_redelivered_up_to_max_deliver_then_dead_lettered(
    batch_size, nats_server, tmp_path, js
):
    service = make_service(nats_server.url, tmp_path)
    attempts: dict[str, int] = {}
    poison = make_event(DeployRequested(model_ref="poison"), SOURCE)
    after = make_event(DeployRequested(model_ref="fine"), SOURCE)

    async def handler(event: Event) -> None:
        attempts[event.data.model_ref] = attempts.get(event.data.model_ref, 0) + 1
        if event.data.model_ref == "poison":
            raise RuntimeError("cannot place model 'poison'")

    service.consume("evt.deploy.>", max_deliver=3, retry_delay_s=0.05, batch_size=batch_size).on(DeployRequested)(
        handler
    )
    async with service.running():
        await bus.publish(service.broker, poison)
        await bus.publish(service.broker, after)
        await eventually(lambda: service.consumer.stats.dead_lettered == 1 and "fine" in attempts, what="dead letter")
        await asyncio.sleep(0.3)  # a fourth delivery would show up here
    assert attempts == {"poison": 3, "fine": 1}
    [letter] = await dead_letters(js)
    assert letter.event_id == poison.id and letter.deliveries == 3
    assert letter.reason == "handler failed 3 times: RuntimeError: cannot place model 'poison'"
    assert service.consumer.stats.retried == 2


@BATCH_SIZES
async def test_a_transient_failure_is_retried_and_then_handled_once(batch_size, nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    calls: list[int] = []

    async def flaky(event: Event) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("store briefly unavailable")

    service.consume("evt.deploy.>", retry_delay_s=0.05, batch_size=batch_size).on(DeployRequested)(flaky)
    async with service.running():
        await bus.publish(service.broker, make_event(DeployRequested(model_ref="tiny"), SOURCE))
        await eventually(lambda: service.consumer.stats.handled == 1, what="handled")
    assert len(calls) == 3
    assert service.consumer.stats.dead_lettered == 0
    assert await dead_letters(js) == []


@BATCH_SIZES
async def test_bytes_that_break_a_json_decoder_are_dead_lettered_once_and_consuming_goes_on(
    batch_size, nats_server, tmp_path, js
):
    """#20 item 5: 50,000 nested '[' raised RecursionError inside FastStream's decoding in the inventory
    and the worker: 22 tracebacks across redeliveries, and no dead letter."""
    service = make_service(nats_server.url, tmp_path)
    seen: list[str] = []
    service.consume("evt.deploy.>", batch_size=batch_size).on(DeployRequested)(lambda e: _record(seen, e))
    await js.publish(
        "evt.deploy.requested", b"[" * 50_000, headers={"Nats-Msg-Id": "deep-1", "content-type": "application/json"}
    )
    await js.publish("evt.deploy.requested", make_event(DeployRequested(model_ref="after"), SOURCE).to_bytes())
    async with service.running():
        await eventually(lambda: seen == ["after"], what="the event after the deep one")
        await eventually(lambda: service.consumer.stats.dead_lettered == 1, what="one dead letter")
        await asyncio.sleep(0.5)  # no redelivery comes back for a second dead letter
    [letter] = await dead_letters(js)
    assert letter.subject == "evt.deploy.requested" and letter.deliveries == 1 and letter.payload_bytes == 50_000
    assert "invalid envelope" in letter.reason, letter.reason


@BATCH_SIZES
async def test_one_event_id_delivered_twice_is_handled_once(batch_size, nats_server, tmp_path, js):
    """The stream stores both copies (each has its own Nats-Msg-Id), the consumer handles the id once."""
    service = make_service(nats_server.url, tmp_path)
    seen: list[str] = []
    service.consume("evt.deploy.>", batch_size=batch_size).on(DeployRequested)(lambda e: _record(seen, e))
    event = make_event(DeployRequested(model_ref="once"), SOURCE)
    later = make_event(DeployRequested(model_ref="after"), SOURCE)
    for msg_id, body in (("copy-1", event.to_bytes()), ("copy-2", event.to_bytes()), ("later", later.to_bytes())):
        await js.publish("evt.deploy.requested", body, headers={"Nats-Msg-Id": msg_id})
    assert (await js.stream_info(subjects.EVENTS_STREAM)).state.messages == 3
    async with service.running():
        await eventually(lambda: seen[-1:] == ["after"], what="the event after the duplicate")
    assert seen == ["once", "after"]
    assert service.consumer.stats.handled == 2 and service.consumer.stats.ignored == 1


async def test_the_consumer_is_durable_across_a_service_restart(nats_server, tmp_path, js):
    seen: list[str] = []
    first = make_service(nats_server.url, tmp_path)
    first.consume("evt.deploy.>").on(DeployRequested)(lambda e: _record(seen, e))
    async with first.running():
        await bus.publish(first.broker, make_event(DeployRequested(model_ref="one"), SOURCE))
        await eventually(lambda: len(seen) == 1)
    # Published while the service is down: the durable consumer delivers it after the restart.
    await js.publish("evt.deploy.requested", make_event(DeployRequested(model_ref="two"), SOURCE).to_bytes())
    second = make_service(nats_server.url, tmp_path)
    second.consume("evt.deploy.>").on(DeployRequested)(lambda e: _record(seen, e))
    async with second.running():
        await eventually(lambda: len(seen) == 2, what="the event published while down")
    assert seen == ["one", "two"]


async def test_a_batched_consumer_does_not_wait_to_fill_its_batch(nats_server, tmp_path):
    service = make_service(nats_server.url, tmp_path)
    seen: list[str] = []
    # a fetch that waited for all 64 would hold this one event for its whole 30 s time-out
    service.consume("evt.deploy.>", batch_size=64, batch_wait_s=30).on(DeployRequested)(lambda e: _record(seen, e))
    async with service.running():
        await bus.publish(service.broker, make_event(DeployRequested(model_ref="alone"), SOURCE))
        await eventually(lambda: seen == ["alone"], timeout=10, what="the lone event")


async def test_a_batched_consumer_resumes_after_nats_restarts(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    seen: list[Event] = []

    async def remember(event: Event) -> None:
        seen.append(event)

    service.consume("evt.deploy.>", batch_size=16).on(DeployRequested)(remember)
    async with service.running():
        publisher = make_service(nats_server.url, tmp_path / "publisher")
        async with publisher.running():
            for _ in range(3):
                await bus.publish(publisher.broker, make_event(DeployRequested(model_ref="tiny"), SOURCE))
            await eventually(lambda: len(seen) == 3, what="the events before the restart")
            nats_server.restart()
            await eventually(
                lambda: publisher.broker.connection.is_connected and service.broker.connection.is_connected,
                timeout=20,
                what="both reconnected",
            )
            for _ in range(3):
                await bus.publish(publisher.broker, make_event(DeployRequested(model_ref="tiny"), SOURCE))
            await eventually(lambda: len(seen) == 6, timeout=20, what="the events after the restart")
    assert len({e.id for e in seen}) == 6 and service.consumer.stats.handled == 6


async def test_other_event_types_under_the_filter_are_acknowledged_not_retried(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    service.consume("evt.deploy.>").on(DeployRequested)(lambda e: _record([], e))
    async with service.running():
        await bus.publish(
            service.broker, make_event(DeployRejected(deployment_id="d", model_ref="m", reason="no fit"), SOURCE)
        )
        await eventually(lambda: service.consumer.stats.ignored == 1)
        # counted, then acknowledged: the ack reaches the server a moment after the count
        for _ in range(100):
            info = await js.consumer_info(subjects.EVENTS_STREAM, "hardware-inventory")
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # longer than the consumer's 0.2 s retry delay: a nak would show by now
        info = await js.consumer_info(subjects.EVENTS_STREAM, "hardware-inventory")
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0
    assert service.consumer.stats.retried == 0


async def test_health_answers_over_nats_rpc(nats_server, tmp_path):
    service = make_service(nats_server.url, tmp_path, name="model-store")
    async with service.running():
        nc = await nats.connect(nats_server.url)
        reply = await nc.request(subjects.rpc("model-store", "health"), b"", timeout=5)
        await nc.close()
    health = json.loads(reply.data)
    assert health["service"] == "model-store" and health["status"] == "ok" and health["nats_connected"] is True


async def test_health_names_start_up_work_still_catching_up(nats_server, tmp_path):
    service = make_service(nats_server.url, tmp_path, name="monitor")
    async with service.running():
        assert service.health().catching_up == []
        service.catching_up.add("replay")  # as the monitor does while it reads its state back
        health = service.health()
        assert health.catching_up == ["replay"]
        assert health.status == "ok"  # it serves meanwhile: strata up's wait and load balancers keep it
        service.catching_up.discard("replay")
        assert service.health().catching_up == []


async def _record(seen: list, event: Event) -> None:
    seen.append(event.data.model_ref if hasattr(event.data, "model_ref") else event)


@BATCH_SIZES
async def test_events_are_handled_one_at_a_time_in_stream_order(batch_size, nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    order: list[str] = []
    running = 0

    async def slow(event: Event) -> None:
        nonlocal running
        running += 1
        assert running == 1, "two events handled at once"
        await asyncio.sleep(0.01)
        order.append(event.data.model_ref)
        running -= 1

    service.consume("evt.deploy.>", batch_size=batch_size).on(DeployRequested)(slow)
    refs = [f"m{i}" for i in range(20)]
    for ref in refs:
        await js.publish("evt.deploy.requested", make_event(DeployRequested(model_ref=ref), SOURCE).to_bytes())
    async with service.running():
        await eventually(lambda: len(order) == len(refs) or service.consumer.stats.retried, what="all handled")
    assert order == refs and service.consumer.stats.retried == 0


async def test_declaring_the_streams_again_never_lowers_their_replica_count(tmp_path):
    from cli.cluster import LocalCluster

    with LocalCluster(tmp_path / "cluster", size=3) as cluster:
        nc = await nats.connect(cluster.url)
        try:
            js = nc.jetstream()
            await bus.ensure_streams(js, replicas=3)
            await bus.ensure_streams(js)  # a client that does not know the cluster's setting
            info = await js.stream_info(subjects.EVENTS_STREAM)
        finally:
            await nc.close()
    assert info.config.num_replicas == 3


class _RepliesLost:
    """A real JetStream context whose first stream create or update reaches the server but whose reply
    is lost, as when a replicated stream's raft group takes longer to elect a leader than the client
    waits (seen in CI: a 3-node cluster on 2 loaded cores, 'nats: timeout' on STREAM.CREATE)."""

    def __init__(self, js) -> None:
        self.js, self.lost = js, 0

    def __getattr__(self, name):
        return getattr(self.js, name)

    async def _then_lose(self, call, config):
        result = await call(config)
        if self.lost < 2:
            self.lost += 1
            raise nats.errors.TimeoutError
        return result

    async def add_stream(self, config):
        return await self._then_lose(self.js.add_stream, config)

    async def update_stream(self, config):
        return await self._then_lose(self.js.update_stream, config)


async def test_declaring_a_stream_rides_out_a_reply_lost_after_the_server_acted(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = _RepliesLost(nc.jetstream())
        await bus.ensure_streams(js)
        await bus.declare_streams(js, bus.stream_configs())
        names = {info.config.name for info in await nc.jetstream().streams_info()}
    finally:
        await nc.close()
    assert js.lost == 2
    assert {subjects.EVENTS_STREAM, subjects.DEADLETTER_STREAM} <= names


async def test_a_message_near_the_nats_size_limit_is_dead_lettered_with_a_capped_copy(nats_server, tmp_path, js):
    service = make_service(nats_server.url, tmp_path)
    service.consume("evt.deploy.>").on(DeployRequested)(lambda e: _record([], e))
    huge = b'{"id": "' + b"x" * 900_000 + b'"}'
    async with service.running():
        await js.publish("evt.deploy.requested", huge)
        await eventually(lambda: service.consumer.stats.dead_lettered == 1, what="the dead letter")
    [letter] = await dead_letters(js)
    assert letter.truncated and letter.payload_bytes == len(huge)
    assert len(letter.payload) == pull.PAYLOAD_MAX and letter.reason.startswith("invalid envelope")
