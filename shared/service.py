"""What every Strata service process is: a FastStream NATS broker and a FastAPI HTTP app that share
one lifespan, a health check on both (``rpc.<service>.health`` and ``GET /healthz``), and helpers to
publish events and to consume them durably."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from faststream.nats.annotations import NatsMessage
from faststream.specification import AsyncAPI
from pydantic import BaseModel, Field

from shared import bus, errors, http_errors, http_tls, replication, rpc, subjects
from shared.config import SERVICES, Settings, module_name
from shared.contracts import Consumes, Contract, Subscription, contracts, resolve
from shared.events import Event, EventData, Source, make_event
from shared.service_metrics import HttpMetrics, ServiceMetrics
from shared.telemetry import TraceContext, metrics_exported, setup_tracing, skip_http_telemetry

VERSION = "0.1.0"
Hook = Callable[[], Awaitable[None]]
RpcHandler = Callable[[Any], Awaitable[Any]]
P = TypeVar("P")


class ConsumerHealth(BaseModel):
    durable: str
    filter_subject: str
    handled: int
    ignored: int
    retried: int
    dead_lettered: int
    by_type: dict[str, int]


class Health(BaseModel):
    service: str
    node: str
    version: str
    status: Literal["ok", "starting", "degraded"]
    nats_connected: bool
    uptime_s: float
    consumer: ConsumerHealth | None = None
    catching_up: list[str] = Field(default=[], description="start-up work still running in the background (the "
                                   "monitor's replay of its state): the service serves, its state is not whole yet")


class Service:
    def __init__(self, name: str, settings: Settings | None = None, *, description: str = "") -> None:
        self.name = name
        self.settings = settings or Settings.from_env(name)
        self.source = Source(service=name, node=self.settings.node_id)
        setup_tracing(name, self.settings.node_id)
        self.broker = bus.make_broker(self.settings.nats_url, f"strata-{name}@{self.settings.node_id}", role=name)
        # FastAPI's HTTP server span where spans are recorded (TraceContext carries the caller's trace
        # where they are not); never its per-operation spans, which cost CPU on every request for little;
        # its HTTP metrics only where they are exported.
        self.http = FastAPI(
            title=f"Strata {name}",
            version=VERSION,
            description=description,
            lifespan=self._lifespan,
            telemetry={"operation_spans": False, "metrics": metrics_exported(), "exclude": skip_http_telemetry},
        )
        self.http.add_middleware(TraceContext)
        self.metrics = ServiceMetrics(name)
        self.http.add_middleware(HttpMetrics, metrics=self.metrics)
        # its durable event consumers: consume() or consume_declared(); the lifespan starts and stops them
        self.consumers: list[bus.EventConsumer] = []
        self.metrics.counters(
            "strata_events", "Events this service's consumer took, by outcome", ["outcome"], self._consumer_counts
        )
        self.ready = False
        self._parts: dict[type, object] = {}  # what the start hooks built: provide() / part()
        # the contract's consumers and subscriptions registered through handle() and subscribe(), with the
        # handlers the contract names (tests/foundation/test_contracts.py checks each is, once)
        self.registered: list[Consumes | Subscription] = []
        self.http.state.service = self  # module-level routes reach the parts through the request (part_of)
        self.catching_up: set[str] = set()  # start-up work still running in the background (see Health)
        self._started = time.monotonic()
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        # what FastStream cannot see: subjects served with nats-py directly (serving_asyncapi.py)
        self.asyncapi_extensions: list[Callable[[dict[str, Any]], None]] = []
        self.http.get("/healthz", response_model=Health, tags=["health"])(self._health_http)
        self.http.exception_handler(errors.StrataError)(_error_response)
        http_errors.typed_bad_requests(self.http)  # FastAPI's own 400 (an unreadable body) in the typed shape too
        http_errors.typed_internal_errors(self.http, name)
        self.broker.subscriber(subjects.rpc(name, "health"), queue=name, title=f"{name}:health")(self._health_rpc)
        self._document_own_events()
        self.http.get(
            "/metrics",
            tags=["health"],
            summary="Prometheus exposition of this service's metrics",
            response_class=Response,
        )(self._metrics_http)
        self.http.get("/asyncapi.json", tags=["health"], summary="AsyncAPI document of this service's NATS interface")(
            self.asyncapi
        )

    # -- documentation ---------------------------------------------------------------------
    def _document_own_events(self) -> None:
        """Declare the events this service publishes, so FastStream's AsyncAPI document shows them."""
        for data_cls in EventData.registry.values():
            if data_cls.PUBLISHER == self.name:
                self.broker.publisher(
                    data_cls.subject(),
                    schema=Event[data_cls],
                    title=f"{self.name}:{data_cls.TYPE}",  # type: ignore[valid-type]
                    description=(data_cls.__doc__ or data_cls.TYPE).strip(),
                )

    def asyncapi(self) -> dict[str, Any]:
        spec = AsyncAPI(self.broker, title=f"Strata {self.name}", version=VERSION, description=self.http.description)
        doc = spec.to_specification().to_jsonable()
        for extend in self.asyncapi_extensions:
            extend(doc)
        self._document_declared(doc)
        return doc

    def _document_declared(self, doc: dict[str, Any]) -> None:
        """The contract's core subscriptions that no channel shows yet (those made with nats-py at run
        time, such as the gateway's inference.completed): a channel each, naming its handler."""
        contract = contracts().get(self.name)
        if contract is None:
            return
        channels = doc.setdefault("channels", {})
        known = {channel.get("address") for channel in channels.values()}
        for sub in contract.subscriptions:
            if sub.subject not in known:
                parameters = re.findall(r"{(\w+)}", sub.subject)
                channels[f"{self.name}:{sub.subject}"] = {
                    "address": sub.subject,
                    "description": f"{sub.purpose} (handled by {sub.handler})",
                    **(
                        {"parameters": {p: {"description": f"the {p}, as one subject token"} for p in parameters}}
                        if parameters
                        else {}
                    ),
                }

    # -- events ------------------------------------------------------------------------------
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

    async def publish(self, data: EventData, *, event_id: str | None = None) -> Event[Any]:
        """Publish one of this service's own events (each event type has exactly one publisher)."""
        if data.PUBLISHER != self.name:
            raise PermissionError(f"{self.name} may not publish {data.TYPE}: only {data.PUBLISHER} does")
        event = make_event(data, self.source, event_id=event_id)
        await bus.publish(self.broker, event)
        return event

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

    def subscribe(self, subscription: Subscription, *, title: str) -> None:
        """A declared core subscription that lasts as long as the service (FastStream documents it)."""
        self.registered.append(subscription)
        handle = self._bind(subscription.handler)

        async def receive(msg: NatsMessage) -> None:
            await handle(msg)

        receive.__name__ = title.replace("-", "_")
        self.broker.subscriber(subscription.subject, queue=subscription.queue, title=f"{self.name}:{title}")(receive)

    def _bind(self, handler: str) -> RpcHandler:
        module, _, qualname = handler.partition(":")
        owner, _, method = qualname.rpartition(".")
        if not owner:
            function = resolve(handler)
            return lambda request: function(self, request)
        cls = resolve(f"{module}:{owner}")
        return lambda request: getattr(self.part(cls), method)(request)

    # -- started parts -------------------------------------------------------------------------
    def provide(self, part: object, *, as_type: type | None = None) -> None:
        """Hold a part the start built (a service-layer object), for ``part()`` and the handlers."""
        self._parts[as_type or type(part)] = part

    def withdraw(self, kind: type[P]) -> P | None:
        """Stop holding a part (at stop): handlers answer "not started yet" again."""
        return self._parts.pop(kind, None)  # type: ignore[return-value]

    def part(self, kind: type[P]) -> P:
        """The started part of that type; while the service starts (or after it stopped): 503."""
        found = self._parts.get(kind)
        if found is None:
            raise errors.Unavailable(f"{self.name} is starting: not started yet ({kind.__name__})")
        return found  # type: ignore[return-value]

    def has(self, kind: type) -> bool:
        return kind in self._parts

    # -- metrics -----------------------------------------------------------------------------
    async def _metrics_http(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _consumer_counts(self):
        stats = self.consumer.stats if self.consumer else bus.ConsumerStats()
        return [
            (["handled"], stats.handled),
            (["ignored"], stats.ignored),
            (["retried"], stats.retried),
            (["dead_lettered"], stats.dead_lettered),
        ]

    # -- lifecycle ---------------------------------------------------------------------------
    def on_start(self, hook: Hook) -> Hook:
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        self._on_stop.append(hook)
        return hook

    def running(self) -> AbstractAsyncContextManager[None]:
        """The service connected and consuming, without HTTP: ``async with service.running(): ...``."""
        return self._lifespan(self.http)

    @asynccontextmanager
    async def _lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        for consumer in self.consumers:
            consumer.attach(self.broker)
        await self.broker.connect()
        await bus.ensure_streams(self.broker.connection.jetstream(), replication.stream_replicas())
        await self.broker.start()
        for consumer in self.consumers:
            await consumer.start()
        for hook in self._on_start:
            await hook()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for hook in reversed(self._on_stop):
                await hook()
            for consumer in reversed(self.consumers):
                await consumer.stop()
            await self.broker.stop()

    # -- health ------------------------------------------------------------------------------
    def health(self) -> Health:
        connected = self.ready and self.broker.connection.is_connected
        consumer = None
        if self.consumer is not None:
            c, s = self.consumer, self.consumer.stats
            consumer = ConsumerHealth(
                durable=c.durable,
                filter_subject=c.filter_subject,
                handled=s.handled,
                ignored=s.ignored,
                retried=s.retried,
                dead_lettered=s.dead_lettered,
                by_type=dict(s.by_type),
            )
        status = "starting" if not self.ready else "ok" if connected else "degraded"
        return Health(
            service=self.name,
            node=self.settings.node_id,
            version=VERSION,
            status=status,
            nats_connected=connected,
            uptime_s=round(time.monotonic() - self._started, 3),
            consumer=consumer,
            catching_up=sorted(self.catching_up),
        )

    async def _health_http(self) -> JSONResponse:
        health = self.health()
        return JSONResponse(health.model_dump(mode="json"), status_code=200 if health.status == "ok" else 503)

    async def _health_rpc(self) -> dict[str, Any]:
        return self.health().model_dump(mode="json")


def _held_until(ready: asyncio.Event, handle: RpcHandler) -> RpcHandler:
    async def held(event: Any) -> Any:
        if not ready.is_set():
            await ready.wait()
        return await handle(event)

    return held


async def _error_response(_request: Request, exc: errors.StrataError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.http_status)


HTTPS_STOP_WAIT_S = 5.0  # run(): how long a stopping HTTPS service waits for open connections


def run(service: Service) -> None:
    """Serve a service until SIGINT/SIGTERM (uvicorn handles both and runs the lifespan's shutdown)."""
    logging.basicConfig(
        level=os.environ.get("STRATA_LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        https = http_tls.served()  # STRATA_HTTP_TLS_CERT/KEY: checked here, so a bad file is one clear line
    except http_tls.TlsSetupError as exc:
        raise SystemExit(f"{service.name}: cannot serve HTTPS: {exc}") from None
    config = uvicorn.Config(
        service.http,
        host=service.settings.http_host,
        port=service.settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ssl_certfile=str(https.cert) if https else None,
        ssl_keyfile=str(https.key) if https else None,
        # An idle keep-alive TLS client never answers the server's close_notify, and asyncio waits 30 s for it
        # before the connection counts as closed: without a bound, such a client holds up every stop.
        timeout_graceful_shutdown=HTTPS_STOP_WAIT_S if https else None,
    )
    # Server.run, not asyncio.run(serve()): it honours loop="auto" (uvloop when it is installed,
    # with httptools for HTTP), which roughly halves the per-request CPU of the NATS and HTTP paths.
    uvicorn.Server(config).run()


def part_of(kind: type[P]) -> Callable[[Request], P]:
    """A FastAPI dependency: the service's started part of that type (503 while it starts), so that
    routes can be module-level: ``store: ModelStore = Depends(part_of(ModelStore))``."""

    def started_part(request: Request) -> P:
        return request.app.state.service.part(kind)

    started_part.__name__ = f"started_{kind.__name__}"
    return started_part


def service_of(request: Request) -> Service:
    return request.app.state.service


def load(service_name: str, settings: Settings | None = None) -> Service:
    if service_name not in SERVICES:
        raise ValueError(f"unknown service {service_name!r}; choose from {', '.join(SERVICES)}")
    """Build a service by name from ``services/<name>/entrypoints/app.py:create_service``."""
    module = importlib.import_module(f"{module_name(service_name)}.entrypoints.app")
    return module.create_service(settings)
