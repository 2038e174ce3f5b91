"""What every Strata service process is: a FastStream NATS broker and a FastAPI HTTP app that share
one lifespan, a health check on both (``rpc.<service>.health`` and ``GET /healthz``), the parts its
start builds (``provide``/``part``), and the publishing of its own events. What it receives on NATS (RPC
ops, durable event consumers, core subscriptions), registered from its contract, is
shared/service_wiring.py's."""

from __future__ import annotations

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
from faststream.specification import AsyncAPI
from pydantic import BaseModel, Field

from shared import bus, errors, http_errors, http_tls, replication, subjects
from shared.config import SERVICES, Settings, module_name
from shared.contracts import contracts
from shared.events import Event, EventData, Source, make_event
from shared.service_metrics import HttpMetrics, ServiceMetrics
from shared.service_wiring import ContractWiring
from shared.telemetry import TraceContext, metrics_exported, setup_tracing, skip_http_telemetry

VERSION = "0.1.0"
Hook = Callable[[], Awaitable[None]]
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


class Service(ContractWiring):
    """A service process. What it receives on NATS, registered from its contract (``serve``,
    ``consume_declared``, ``subscribe``), is ContractWiring's (shared/service_wiring.py)."""

    def __init__(self, name: str, settings: Settings | None = None, *, description: str = "") -> None:
        super().__init__()
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
        self.metrics.counters(
            "strata_events", "Events this service's consumer took, by outcome", ["outcome"], self._consumer_counts
        )
        self.ready = False
        self._parts: dict[type, object] = {}  # what the start hooks built: provide() / part()
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

    # -- its own events --------------------------------------------------------------------
    async def publish(self, data: EventData, *, event_id: str | None = None) -> Event[Any]:
        """Publish one of this service's own events (each event type has exactly one publisher)."""
        if data.PUBLISHER != self.name:
            raise PermissionError(f"{self.name} may not publish {data.TYPE}: only {data.PUBLISHER} does")
        event = make_event(data, self.source, event_id=event_id)
        await bus.publish(self.broker, event)
        return event

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
    """Build a service by name from ``services/<name>/entrypoints/app.py:create_service``."""
    if service_name not in SERVICES:
        raise ValueError(f"unknown service {service_name!r}; choose from {', '.join(SERVICES)}")
    module = importlib.import_module(f"{module_name(service_name)}.entrypoints.app")
    return module.create_service(settings)
