"""api-gateway: the OpenAI-compatible HTTP edge. It owns nothing durable and consumes no events: it
turns HTTP calls into inference requests on NATS (shared/inference_client.py) and answers in
OpenAI's shapes, with OpenAI's error objects and status codes. API keys (scope ``inference``):
shared/apikey_http.py; their quotas, reserved at admission and settled at the end in counters every
replica shares: service_layer/metering.py.

Wiring only: the routes are entrypoints/routes.py, the error handlers entrypoints/errors.py."""

from __future__ import annotations

from functools import partial

from shared.apikey_http import drop_route, protect
from shared.config import Settings
from shared.contracts import api_gateway as contract
from shared.replication import stream_replicas
from shared.service import Service

from services.api_gateway.adapters.quota_counters import KvQuotaCounters
from services.api_gateway.config import GatewayConfig
from services.api_gateway.entrypoints.errors import EXCEPTION_HANDLERS, Refusals
from services.api_gateway.entrypoints.routes import health_router, inference_router, models_router
from services.api_gateway.service_layer.handlers import Gateway


def create_service(settings: Settings | None = None, config: GatewayConfig | None = None) -> Service:
    config = config or GatewayConfig.from_env()
    service = Service(
        "api-gateway",
        settings,
        description="OpenAI-compatible HTTP API in front of the workers. "
        "Every /v1 route needs an API key with the 'inference' scope (or 'admin'); /healthz is open.",
    )
    # The gateway never writes a key (it makes the bucket only where NATS has no users and nothing provisioned
    # it); STRATA_API_KEYS are honoured by this gateway alone.
    auth = protect(service, create_bucket=True, local_keys=config.seed_keys, health=False)
    # Provided at once: it reaches NATS only through the connection, once started; its quota counters
    # (which live in NATS) are opened at start (open_quotas).
    gateway = Gateway(config, lambda: service.broker.connection, auth)
    service.provide(gateway)
    service.provide(Refusals(service.metrics))
    service.on_start(partial(open_quotas, service))
    for exception, handler in EXCEPTION_HANDLERS.items():
        service.http.add_exception_handler(exception, handler)
    drop_route(service.http, "/healthz")
    for router in (health_router, models_router, inference_router):
        service.http.include_router(router)
    return service


async def open_quotas(service: Service) -> None:
    """Open the quota counters, then settle reservations from inference.completed. That subscription is
    registered here with nats-py, not by Service.subscribe: it exists only once the counters are open,
    and Metering.on_completed reads the raw message (every replica hears every completion, and reads
    only the few fields settlement needs)."""
    nc = service.broker.connection
    metering = service.part(Gateway).metering
    # `strata up` provisions the bucket (cli/provision.py); where NATS has no users, it is made here if missing.
    metering.counters = await KvQuotaCounters.open(nc.jetstream(), stream_replicas(), create=True)
    # every replica, no queue group: the one holding a request's reservation settles it
    await nc.subscribe(contract.COMPLETIONS.subject, cb=metering.on_completed)
