"""What hardware-inventory does with the events it hears (shared/contracts/hardware_inventory.py names
each handler here): the registry's durable consumers, its heartbeats, and the agent's deploy events.
Each takes the service first; app.py binds it."""

from __future__ import annotations

import contextlib
import logging

from faststream.nats.annotations import NatsMessage

from services.hardware_inventory.service_layer.agent import Agent
from services.hardware_inventory.service_layer.registry import Registry
from shared import errors
from shared.events import (
    DeployFailed, DeployReady, DeployRequested, DeployUnloaded, Event, ModelLoaded, ModelUnloaded, NodeRegistered,
    UndeployRequested, parse_event,
)
from shared.inventory import DeployRequest
from shared.service import Service

log = logging.getLogger(__name__)


async def node_registered(service: Service, event: Event[NodeRegistered]) -> None:
    await service.part(Registry).nodes.registered(event.data)


async def heartbeat(service: Service, msg: NatsMessage) -> None:
    if not service.has(Registry):
        return
    try:
        event = parse_event(msg.raw_message.data, msg.raw_message.subject)
    except Exception as exc:
        log.warning("malformed heartbeat ignored: %s", exc)
        return
    await service.part(Registry).nodes.heartbeat(event.data)  # type: ignore[arg-type]


async def deploy_requested(service: Service, event: Event[DeployRequested]) -> None:
    await service.part(Registry).deployments.deploy(
        DeployRequest(**event.data.model_dump(exclude={"deployment_id"}), deployment_id=event.data.deployment_id))


async def undeploy_requested(service: Service, event: Event[UndeployRequested]) -> None:
    with contextlib.suppress(errors.NotFound):  # nothing (left) to undeploy: done
        await service.part(Registry).deployments.undeploy(event.data.model_ref, event.data.deployment_id)


async def deploy_ready(service: Service, event: Event[DeployReady]) -> None:
    await service.part(Registry).deployments.ready(event.data)


async def residency_changed(service: Service, event: Event[ModelLoaded] | Event[ModelUnloaded]) -> None:
    await service.part(Registry).deployments.residency(event.data)


async def deploy_failed(service: Service, event: Event[DeployFailed]) -> None:
    await service.part(Registry).deployments.worker_let_go(event.data.deployment_id, event.data.node_id,
                                                           event.data.reason, failed=True)


async def deploy_unloaded(service: Service, event: Event[DeployUnloaded]) -> None:
    await service.part(Registry).deployments.worker_let_go(event.data.deployment_id, event.data.node_id,
                                                           "unloaded by the worker", failed=False)


async def agent_deploy_event(service: Service, msg: NatsMessage) -> None:
    with contextlib.suppress(Exception):  # someone else's malformed event is not the agent's business
        await service.part(Agent).on_deploy_event(parse_event(msg.raw_message.data, msg.raw_message.subject))


