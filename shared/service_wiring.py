"""What a service receives over NATS, registered from its contract (shared/contracts/): its RPC ops
(``serve``), its durable event consumers (``consume_declared``) and its core subscriptions
(``subscribe``), each message routed to the handler the contract names next to it.

``ContractWiring`` is a base of ``Service`` (shared/service.py), which owns the broker, the parts the
handlers reach and the lifespan that starts the consumers: kept apart so that the process (HTTP,
health, lifecycle) and the contract's registration each read on their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from pydantic import BaseModel

from shared import bus, rpc, subjects
from shared.config import Settings
from shared.contracts import Consumes, Contract, Subscription, resolve
from shared.events import EventData
from shared.service_metrics import ServiceMetrics

RpcHandler = Callable[[Any], Awaitable[Any]]


class ContractWiring:
    """Service's base: the registration of what it receives on NATS (``Service`` sets the attributes
    declared here before anything is registered)."""

    name: str
    settings: Settings
    broker: NatsBroker
    metrics: ServiceMetrics
    part: Callable[[type], Any]

    def __init__(self) -> None:
        # its durable event consumers: consume() or consume_declared(); the lifespan starts and stops them
        self.consumers: list[bus.EventConsumer] = []
        # the contract's consumers and subscriptions registered through handle() and subscribe(), with the
        # handlers the contract names (tests/foundation/test_contracts.py checks each is, once)
        self.registered: list[Consumes | Subscription] = []

    # -- RPC -----------------------------------------------------------------------------------
    def rpc(
        self, op: str, request_type: type[BaseModel], *, every_replica: bool = False
    ) -> Callable[[RpcHandler], RpcHandler]:
        """Serve ``rpc.<service>.<op>``: ``@service.rpc("resolve", ResolveRequest)`` over
        ``async def resolve(request) -> result``; errors go back typed (see shared/rpc.py).
        ``every_replica``: no queue group, every replica answers (the caller gathers the replies)."""

        def register(handler: RpcHandler) -> RpcHandler:
            async def receive(msg: NatsMessage) -> bytes:
                started = time.perf_counter()
                reply = await rpc.answer(msg.body, request_type, handler)
                self.metrics.rpc(op, reply, time.perf_counter() - started)
                return reply

            receive.__name__ = f"rpc_{op}"
            queue = None if every_replica else self.name
            self.broker.subscriber(subjects.rpc(self.name, op), queue=queue, title=f"{self.name}:{op}")(receive)
            return handler

        return register

    def serve(self, contract: Contract) -> None:
        """Serve the contract's RPC ops, each by the handler named next to it: a module-level
        ``async def op(service, request)``, or ``Class.method`` of a part this service provides."""
        for op in contract.rpc:
            self.rpc(op.op, op.request, every_replica=op.every_replica)(self._bind(op.handler))

    # -- events ----------------------------------------------------------------------------------
    @property
    def consumer(self) -> bus.EventConsumer | None:
        """Its first consumer: the one /healthz and ``strata_events`` report."""
        return self.consumers[0] if self.consumers else None

    def consume(
        self, filter_subject: str = subjects.EVENTS_ALL, *, durable: str | None = None, **options: Any
    ) -> bus.EventConsumer:
        """This service's durable consumer. Register handlers on it with ``@consumer.on(EventType)``."""
        if self.consumers:
            raise RuntimeError(f"{self.name} already has a consumer")
        return self._add_consumer(filter_subject, durable or self.name, **options)

    def _add_consumer(self, filter_subject: str, durable: str, **options: Any) -> bus.EventConsumer:
        consumer = bus.EventConsumer(service=self.name, durable=durable, filter_subject=filter_subject, **options)
        self.consumers.append(consumer)
        return consumer

    def consume_declared(
        self, contract: Contract, *, durable: str | None = None, until: asyncio.Event | None = None, **options: Any
    ) -> list[bus.EventConsumer]:
        """Run the contract's event consumers, as ``serve`` does its RPC ops: every ``Consumes`` without
        ``registered_by`` (those with it run their own), each on its own durable (one per node where its
        name says ``{node}``), each event type routed to the handler named next to it. The first is
        ``consumer``, the one /healthz reports. ``durable``: a configured name instead of the contract's
        (for a contract with one such consumer); ``until``: hold every event until it is set (the
        monitor's replay); ``options``: EventConsumer's (``batch_size``)."""
        ours = [c for c in contract.consumes if not c.registered_by]
        if self.consumers and ours:
            raise RuntimeError(f"{self.name} already has a consumer")
        if durable is not None and len(ours) > 1:
            raise ValueError(f"{self.name}: one configured durable for {len(ours)} consumers")
        for consumes in ours:
            if consumes.stream != subjects.EVENTS_STREAM:
                raise ValueError(f"{self.name}: {consumes.durable} reads {consumes.stream}, Service's consumers read "
                                 f"{subjects.EVENTS_STREAM}: give it a registered_by")
        for consumes in ours:
            name = durable or consumes.durable.format(node=subjects.token(self.settings.node_id))
            self.handle(consumes, self._add_consumer(consumes.filter, name, **options), until=until)
        return self.consumers

    def handle(self, consumes: Consumes, consumer: bus.EventConsumer, *, until: asyncio.Event | None = None) -> None:
        """Route a declared consumer's events to the handlers the contract names for them (``EventData``:
        every event without a handler of its own); with ``until``, each waits for it to be set."""
        for event_type, handler in consumes.handlers.items():
            bound = self._bind(handler) if until is None else _held_until(until, self._bind(handler))
            if event_type is EventData:
                consumer.on_any(bound)
            else:
                consumer.on(event_type)(bound)
        self.registered.append(consumes)

    # -- core subscriptions ----------------------------------------------------------------------
    def subscribe(self, subscription: Subscription, *, title: str) -> None:
        """A declared core subscription that lasts as long as the service (FastStream documents it)."""
        self.registered.append(subscription)
        handle = self._bind(subscription.handler)

        async def receive(msg: NatsMessage) -> None:
            await handle(msg)

        receive.__name__ = title.replace("-", "_")
        self.broker.subscriber(subscription.subject, queue=subscription.queue, title=f"{self.name}:{title}")(receive)

    # -- handlers --------------------------------------------------------------------------------
    def _bind(self, handler: str) -> RpcHandler:
        module, _, qualname = handler.partition(":")
        owner, _, method = qualname.rpartition(".")
        if not owner:
            function = resolve(handler)
            return lambda request: function(self, request)
        cls = resolve(f"{module}:{owner}")
        return lambda request: getattr(self.part(cls), method)(request)


def _held_until(ready: asyncio.Event, handle: RpcHandler) -> RpcHandler:
    async def held(event: Any) -> Any:
        if not ready.is_set():
            await ready.wait()
        return await handle(event)

    return held
