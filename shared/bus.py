"""The event backbone: JetStream streams, publishing events, and durable consumers that never drop one.

A consumer acknowledges an event only after its handler returned. A handler that raises gets the
event again (with back-off) up to ``max_deliver`` times; after that, and at once for bytes that are
not a valid event, the message goes to the ``DEADLETTER`` stream with the reason, and the consumer
carries on with the next event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import weakref
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.security import NatsSecurity
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, PubAck, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError
from opentelemetry import propagate, trace

from shared import nats_auth, nats_tls, pull, subjects
from shared.events import Event, EventData, MalformedEvent, make_event, parse_event

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("strata.bus")

MAX_DELIVER = 5
DUPLICATE_WINDOW_S = 120.0
STREAM_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_ALL],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            subjects=[subjects.DEADLETTER_ALL],
            storage=StorageType.FILE,
            num_replicas=replicas,
        ),
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """A service's start: EVENTS and DEADLETTER exist (created by the bootstrap credential, cli/provision.py);
    where NATS has no users, a missing one is created here."""
    await declare_streams(js, stream_configs(replicas), update=False)


async def declare_streams(js: JetStreamContext, configs: list[StreamConfig], *, update: bool = True) -> None:
    """Create each stream where missing; with ``update`` (the bootstrap credential) bring an existing one
    to ``config``. An update never lowers the replica count: a client started without the cluster's
    setting must not shrink it. Each declaration is repeatable, so one whose reply was lost (a
    replicated stream's raft group still electing its leader) is tried again rather than failing a
    start."""
    for config in configs:
        assert config.name is not None
        await retry_transient(f"declare stream {config.name}", lambda c=config: _declare_stream(js, c, update))


async def _declare_stream(js: JetStreamContext, config: StreamConfig, update: bool) -> None:
    assert config.name is not None
    try:
        current = (await js.stream_info(config.name)).config
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError as exc:  # created meanwhile by another process
            if exc.err_code != STREAM_IN_USE:
                raise
            current = (await js.stream_info(config.name)).config
    if update:
        replicas = max(current.num_replicas or 1, config.num_replicas or 1)
        await js.update_stream(dataclasses.replace(config, num_replicas=replicas))


def make_broker(nats_url: str, client_name: str, role: str | None = None, **options: Any) -> NatsBroker:
    """A FastStream broker that reconnects forever and carries the trace context in NATS headers; over
    TLS trusting the CA named by ``STRATA_NATS_CA`` where set (shared/nats_tls.py). ``role``: the
    service, whose NATS user may read replies on its own inbox prefix only."""
    bus_log = logging.getLogger(f"strata.bus.{client_name}")
    tls = nats_tls.client_context()
    bus_log.setLevel(os.environ.get("STRATA_BUS_LOG_LEVEL", "WARNING").upper())
    return NatsBroker(
        # the service's own NATS user, where strata up gave it one; a comma-separated URL list is the
        # members of a cluster, each a server to (re)connect to
        [url.strip() for url in nats_auth.with_env_credentials(nats_url).split(",")],
        inbox_prefix=nats_auth.inbox_prefix(role),
        decoder=raw_body,  # every handler parses the bytes itself
        name=client_name,
        logger=bus_log,
        log_level=logging.DEBUG,  # one line per message is too much for a service at thousands of events/s
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        middlewares=[NatsTelemetryMiddleware()],
        security=NatsSecurity(ssl_context=tls) if tls else None,
        **options,
    )


# What a JetStream request (a publish, an Object Store read) can meet while a clustered stream elects a
# leader or a route reconnects: no responder, no reply in time, a 503.
TRANSIENT_JETSTREAM_ERRORS = (NoStreamResponseError, nats.errors.TimeoutError, ServiceUnavailableError)
# A publish also: an ack reply with no body (nats-py then fails to parse it: nats-io/nats.py#639, seen
# here on a single server too). The event id is the stream's de-duplication key, so publishing again
# cannot store the event twice.
_TRANSIENT_PUBLISH_ERRORS = (*TRANSIENT_JETSTREAM_ERRORS, json.JSONDecodeError)
RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
T = TypeVar("T")


async def publish(broker: NatsBroker, event: Event[Any]) -> PubAck | None:
    """Publish an event. Persistent events get a PubAck from JetStream (``duplicate`` set when the
    event id was already stored), retried through a transient hiccup (about 8 s in all); live
    telemetry goes through core NATS and returns None.

    nats-py directly rather than FastStream's publisher: its middleware (a publish span and two
    metrics per message) cost the inference-worker more CPU per request than the publish itself. The
    caller's trace context still travels in the headers, so every consumer continues the trace."""
    nc = broker.connection
    if not EventData.registry[event.type].PERSISTENT:
        await nc.publish(event.subject, event.to_bytes(), headers=_headers(event))
        return None
    return await publish_js(_jetstream(nc), event)


async def publish_js(js: JetStreamContext, event: Event[Any]) -> PubAck:
    """A persistent event on a plain nats-py JetStream context (the CLI, tests): stored in EVENTS,
    with the retries."""
    body, headers = event.to_bytes(), _headers(event)
    return await _stored(event, lambda: js.publish(event.subject, body, headers=headers, stream=subjects.EVENTS_STREAM))


def _headers(event: Event[Any]) -> dict[str, str]:
    headers = {"Nats-Msg-Id": event.id, "content-type": "application/json"}
    propagate.inject(headers)
    return headers


_jetstreams: weakref.WeakKeyDictionary[Any, JetStreamContext] = weakref.WeakKeyDictionary()


def _jetstream(nc: Any) -> JetStreamContext:
    if (js := _jetstreams.get(nc)) is None:
        js = _jetstreams[nc] = nc.jetstream()
    return js


async def _stored(event: Event[Any], attempt: Callable[[], Awaitable[PubAck]]) -> PubAck:
    return await retry_transient(f"publish {event.type} {event.id}", attempt, _TRANSIENT_PUBLISH_ERRORS)


async def retry_transient(what: str, attempt: Callable[[], Awaitable[T]],
                          transient: tuple[type[BaseException], ...] = TRANSIENT_JETSTREAM_ERRORS) -> T:
    """``attempt()``, tried again through a transient JetStream hiccup (about 8 s in all); the last
    failure is raised. ``attempt`` must be safe to repeat."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await attempt()
        except transient as exc:
            if delay is None:
                raise
            log.info("%s: %s (%s); again in %.2fs", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def raw_body(msg: Any) -> bytes:
    """A FastStream decoder that leaves the body as bytes: our handlers parse it themselves (with
    pydantic, which bounds nesting), where FastStream's JSON decoding raised RecursionError on 50,000
    nested '[' before any handler could dead-letter the message."""
    return msg.body


Handler = Callable[[Event[Any]], Awaitable[None]]
D = TypeVar("D", bound=EventData)


@dataclass
class ConsumerStats:
    handled: int = 0
    ignored: int = 0
    retried: int = 0
    dead_lettered: int = 0
    by_type: Counter[str] = field(default_factory=Counter)


class _RecentIds:
    """Event ids handled lately: a redelivery after a lost ack is not handled twice."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


@dataclass
class EventConsumer:
    """A service's durable pull consumer on the EVENTS stream, dispatching by event type."""

    service: str
    durable: str
    filter_subject: str = subjects.EVENTS_ALL
    max_deliver: int = MAX_DELIVER
    ack_wait_s: float = 30.0
    retry_delay_s: float = 0.2
    # > 1: fetch up to this many events at once (the monitor, which hears every event); each is still
    # handled and acknowledged on its own, in stream order
    batch_size: int = 1
    batch_wait_s: float = 1.0
    handlers: dict[str, Handler] = field(default_factory=dict)
    fallback: Handler | None = None
    stats: ConsumerStats = field(default_factory=ConsumerStats)
    _recent: _RecentIds = field(default_factory=_RecentIds)
    _loop: pull.PullLoop | None = None

    def on(self, data_cls: type[D]) -> Callable[[Callable[[Event[D]], Awaitable[None]]], Handler]:
        """Register the handler for one event type: ``@consumer.on(DeployRequested)``."""

        def register(handler: Handler) -> Handler:
            if data_cls.TYPE in self.handlers:
                raise ValueError(f"{self.service} already handles {data_cls.TYPE}")
            self.handlers[data_cls.TYPE] = handler
            return handler

        return register

    def on_any(self, handler: Handler) -> Handler:
        """The handler for every event type that has no handler of its own (the ledger, the monitor)."""
        self.fallback = handler
        return handler

    def attach(self, broker: NatsBroker) -> None:
        """Remember the broker; ``start`` (after it connected) makes the durable and starts pulling."""
        self._broker = broker

    async def start(self) -> None:
        js = self._broker.connection.jetstream()
        sub = await js.pull_subscribe(self.filter_subject, durable=self.durable, stream=subjects.EVENTS_STREAM,
                                      config=ConsumerConfig(max_deliver=self.max_deliver, ack_wait=self.ack_wait_s,
                                                            ack_policy=AckPolicy.EXPLICIT))
        self._js = js
        self._loop = pull.PullLoop(sub, self._handle_batch, name=f"{self.service}:{self.durable}",
                                   batch=self.batch_size, wait_s=self.batch_wait_s)
        self._loop.start()

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
            self._loop = None

    async def _handle_batch(self, batch: list[Any]) -> None:
        for raw in batch:  # in stream order, one at a time, each settled on its own
            ctx = propagate.extract(raw.headers or {})
            with _tracer.start_as_current_span(
                f"{raw.subject} process",
                context=ctx,
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": raw.subject,
                    "messaging.consumer.group.name": self.durable,
                },
            ):
                try:
                    await self._process(raw)
                except (
                    Exception
                ) as exc:  # e.g. the dead-letter publish while NATS is away: it comes back after ack_wait
                    log.warning(
                        "%s: %s left unacknowledged: %s: %s", self.durable, raw.subject, type(exc).__name__, exc
                    )

    async def _process(self, raw: Any) -> None:
        """Handle one JetStream message and settle it: ack, nak with back-off, or dead letter + term."""
        deliveries = raw.metadata.num_delivered
        try:
            event = parse_event(raw.data, raw.subject)
        except MalformedEvent as exc:
            await self._dead_letter(raw, str(exc), deliveries, None)
            await raw.term()
            return
        handler = self.handlers.get(event.type, self.fallback)
        if handler is None or event.id in self._recent:
            self.stats.ignored += 1
            await raw.ack()
            return
        try:
            await handler(event)
        except Exception as exc:  # any handler failure is retried, then dead-lettered: never lost
            reason = f"{type(exc).__name__}: {exc}"
            if deliveries >= self.max_deliver:
                log.error(
                    "%s: %s %s failed %d times, dead-lettered: %s",
                    self.service,
                    event.type,
                    event.id,
                    deliveries,
                    reason,
                )
                await self._dead_letter(raw, f"handler failed {deliveries} times: {reason}", deliveries, event.id)
                await raw.term()
            else:
                log.warning(
                    "%s: %s %s failed (delivery %d/%d): %s",
                    self.service,
                    event.type,
                    event.id,
                    deliveries,
                    self.max_deliver,
                    reason,
                )
                self.stats.retried += 1
                await raw.nak(delay=self.retry_delay_s * 2 ** (deliveries - 1))
            return
        self._recent.add(event.id)
        self.stats.handled += 1
        self.stats.by_type[event.type] += 1
        await raw.ack()

    async def _dead_letter(self, raw: Any, reason: str, deliveries: int, event_id: str | None) -> None:
        await pull.dead_letter(
            self._js, raw, service=self.service, consumer=self.durable, reason=reason, event_id=event_id
        )
        self.stats.dead_lettered += 1


__all__ = [
    "EventConsumer",
    "ensure_streams",
    "make_broker",
    "make_event",
    "publish",
    "stream_configs",
]
