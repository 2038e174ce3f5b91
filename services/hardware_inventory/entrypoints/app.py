"""hardware-inventory: nodes, devices, the memory-fit model, and placement of deployments.

One codebase, two roles (``STRATA_INVENTORY_ROLES=agent,registry``, both by default): the agent
probes this machine and sends heartbeats; the registry keeps the node table and the bookings in the
JetStream KV bucket and places deployments. Thin: parse, then call service_layer/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from fastapi import Depends, Query
from faststream.nats.annotations import NatsMessage
from prometheus_client import Histogram

from services.hardware_inventory.adapters.catalog import ModelCatalog, RpcModelCatalog
from services.hardware_inventory.adapters.policy_file import load_policy
from services.hardware_inventory.adapters.probe import ProbeSource, StaticProbe, SystemProbe
from services.hardware_inventory.adapters.state import InventoryState
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.domain import placement
from services.hardware_inventory.domain.policy import AdmissionPolicy, PolicyFileError
from services.hardware_inventory.service_layer.agent import Agent
from services.hardware_inventory.service_layer.deployments import Deployments
from services.hardware_inventory.service_layer.nodes import NodeTable
from services.hardware_inventory.service_layer.views import (
    CorrectionList, DeploymentList, DeployOutcome, DeployRequest, Empty, FitReport, FitRequest, NodeList, NodeView,
    UndeployOutcome, UndeployRequest, node_view,
)
from shared import bus, errors, subjects
from shared.apikey_http import protect
from shared.assignments import Assigned, AssignedRequest
from shared.config import Settings
from shared.events import (
    DeployFailed, DeployReady, DeployRequested, DeployUnloaded, Event, ModelLoaded, ModelUnloaded, NodeHeartbeat, NodeRegistered,
    UndeployRequested,
    parse_event,
)
from shared.http_errors import error_responses
from shared.service import Service

log = logging.getLogger(__name__)
NAME = "hardware-inventory"


@dataclass
class Inventory:
    """The parts of one inventory process, reachable from tests as ``service.inventory``."""

    config: InventoryConfig
    agent: Agent | None = None
    state: InventoryState | None = None
    nodes: NodeTable | None = None
    deployments: Deployments | None = None
    admission: AdmissionPolicy | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def create_service(settings: Settings | None = None) -> Service:
    try:
        return create_inventory(settings, InventoryConfig.from_env())
    except PolicyFileError as exc:  # the process stops here, before it connects: one line that names the file and the key
        raise SystemExit(f"{NAME}: {exc.message}") from None


def create_inventory(settings: Settings | None, config: InventoryConfig, *, probe: ProbeSource | None = None,
                     catalog: ModelCatalog | None = None) -> Service:
    service = Service(NAME, settings, description="Nodes, devices, memory fit and placement.")
    inventory = Inventory(config)
    service.inventory = inventory  # type: ignore[attr-defined]
    if "registry" in config.roles:
        inventory.admission = _admission_policy(config)
        _registry(service, inventory, catalog or RpcModelCatalog(lambda: service.broker.connection, config.rpc_timeout_s))
    if "agent" in config.roles:
        source = probe or (StaticProbe(config.probe_file) if config.probe_file else SystemProbe(service.settings.data_dir, config.labels))
        _agent(service, inventory, source)
    return service


def _agent(service: Service, inventory: Inventory, source: ProbeSource) -> None:
    agent = Agent(source, service.settings.node_id, service.publish, inventory.config.heartbeat_interval_s)
    inventory.agent = agent

    @service.broker.subscriber(subjects.DEPLOY_EVENTS, title=f"{NAME}:agent-deploys")
    async def deploy_events(msg: NatsMessage) -> None:
        with contextlib.suppress(Exception):  # someone else's malformed event is not the agent's business
            await agent.on_deploy_event(parse_event(msg.raw_message.data, msg.raw_message.subject))

    service.on_start(agent.start)
    service.on_stop(agent.stop)


def _registry(service: Service, inventory: Inventory, catalog: ModelCatalog) -> None:
    config = inventory.config
    consumer = service.consume(subjects.DEPLOY_EVENTS, durable=NAME)
    node_events = bus.EventConsumer(service=NAME, durable=f"{NAME}-nodes", filter_subject=NodeRegistered.subject())

    def parts() -> tuple[NodeTable, Deployments]:
        if inventory.nodes is None or inventory.deployments is None:
            raise errors.Unavailable("the registry is starting")
        return inventory.nodes, inventory.deployments

    fit_error = Histogram("strata_inventory_booked_to_measured_ratio", "Memory booked for each loaded replica over "
                          "its measured peak (under 1: booked too little)", ["service", "architecture", "device_kind"],
                          buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 1, 1.02, 1.05, 1.1, 1.2, 1.5, 2),
                          registry=service.metrics.registry)

    @service.on_start
    async def open_state() -> None:
        inventory.state = await InventoryState.open(service.broker.connection.jetstream(), config.bucket)
        inventory.nodes = NodeTable(inventory.state, service.publish, config.missed_beats)
        inventory.deployments = Deployments(inventory.state, inventory.nodes, catalog, service.publish, config, inventory.admission)
        inventory.deployments.on_measured.append(
            lambda arch, kind, ratio: fit_error.labels(NAME, arch, kind).observe(ratio))
        inventory.nodes.on_lost.append(inventory.deployments.node_lost)
        inventory.nodes.on_available.append(inventory.deployments.reconcile)
        inventory.tasks.append(asyncio.create_task(_watch_liveness(inventory.nodes, config.heartbeat_interval_s / 2)))

    @service.on_stop
    async def stop_tasks() -> None:
        for task in inventory.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        inventory.tasks.clear()

    # -- events ----------------------------------------------------------------------------------
    @node_events.on(NodeRegistered)
    async def node_registered(event: Event[NodeRegistered]) -> None:
        await parts()[0].registered(event.data)

    node_events.attach(service.broker)
    service.on_start(node_events.start)
    service.on_stop(node_events.stop)

    @service.broker.subscriber(NodeHeartbeat.subject(), title=f"{NAME}:heartbeats")  # no queue: every replica hears every beat
    async def heartbeat(msg: NatsMessage) -> None:
        if inventory.nodes is None:
            return
        try:
            event = parse_event(msg.raw_message.data, msg.raw_message.subject)
        except Exception as exc:
            log.warning("malformed heartbeat ignored: %s", exc)
            return
        await inventory.nodes.heartbeat(event.data)  # type: ignore[arg-type]

    @consumer.on(DeployRequested)
    async def deploy_requested(event: Event[DeployRequested]) -> None:
        await parts()[1].deploy(DeployRequest(**event.data.model_dump(exclude={"deployment_id"}), deployment_id=event.data.deployment_id))

    @consumer.on(UndeployRequested)
    async def undeploy_requested(event: Event[UndeployRequested]) -> None:
        with contextlib.suppress(errors.NotFound):  # nothing (left) to undeploy: done
            await parts()[1].undeploy(event.data.model_ref, event.data.deployment_id)

    @consumer.on(DeployReady)
    async def deploy_ready(event: Event[DeployReady]) -> None:
        await parts()[1].ready(event.data)

    @consumer.on(ModelLoaded)
    async def model_loaded(event: Event[ModelLoaded]) -> None:
        await parts()[1].residency(event.data)

    @consumer.on(ModelUnloaded)
    async def model_unloaded(event: Event[ModelUnloaded]) -> None:
        await parts()[1].residency(event.data)

    @consumer.on(DeployFailed)
    async def deploy_failed(event: Event[DeployFailed]) -> None:
        await parts()[1].worker_let_go(event.data.deployment_id, event.data.node_id, event.data.reason, failed=True)

    @consumer.on(DeployUnloaded)
    async def deploy_unloaded(event: Event[DeployUnloaded]) -> None:
        await parts()[1].worker_let_go(event.data.deployment_id, event.data.node_id, "unloaded by the worker", failed=False)

    # -- queries and commands, over NATS RPC and HTTP ----------------------------------------------
    async def list_nodes(_: Empty | None = None) -> NodeList:
        nodes, _d = parts()
        assert inventory.state is not None
        allocations = await inventory.state.allocations()
        records = await inventory.state.nodes()
        slots = placement.slots(records, allocations, nodes.telemetry, config.utilisation_cap)
        now = nodes.clock()
        return NodeList(nodes=[
            node_view(n, nodes.telemetry.get(n.node_id), now,
                      {d.id: allocations.booked(n.node_id, d.id) for d in n.devices},
                      {s.device.id: s.available for s in slots if s.node.node_id == n.node_id})
            for n in records
        ])

    async def fit(request: FitRequest) -> FitReport:
        return await parts()[1].fit(request)

    async def deploy(request: DeployRequest) -> DeployOutcome:
        return await parts()[1].deploy(request)

    async def list_deployments(_: Empty | None = None) -> DeploymentList:
        parts()
        assert inventory.state is not None
        return DeploymentList(deployments=sorted((await inventory.state.allocations()).deployments.values(), key=lambda d: d.created))

    async def assigned(request: AssignedRequest) -> Assigned:
        return Assigned(scheduled=await parts()[1].assigned(request.node_id))

    async def undeploy(request: UndeployRequest) -> UndeployOutcome:
        return UndeployOutcome(released=await parts()[1].undeploy(request.model_ref, request.deployment_id))

    async def corrections(_: Empty | None = None) -> CorrectionList:
        parts()
        assert inventory.state is not None
        return CorrectionList(corrections=sorted(await inventory.state.corrections(), key=lambda c: c.key))

    for op, body, handler in (("nodes", Empty, list_nodes), ("fit", FitRequest, fit), ("deploy", DeployRequest, deploy),
                              ("deployments", Empty, list_deployments), ("undeploy", UndeployRequest, undeploy),
                              ("corrections", Empty, corrections), ("assigned", AssignedRequest, assigned)):
        service.rpc(op, body)(handler)

    http = service.http
    admin = [Depends(protect(service).require("admin"))]  # deploys and undeploys; reads stay open
    starting = error_responses(errors.Unavailable)  # every route answers 503 until the registry's state is open

    @http.get("/nodes", response_model=NodeList, tags=["nodes"], responses=starting)
    async def nodes_http() -> NodeList:
        return await list_nodes()

    @http.get("/nodes/{node_id}", response_model=NodeView, tags=["nodes"],
              responses=error_responses(errors.NotFound, errors.Unavailable))
    async def get_node(node_id: str) -> NodeView:
        for view in (await list_nodes()).nodes:
            if view.node.node_id == node_id:
                return view
        raise errors.NotFound(f"no node {node_id!r}")

    # the same bounds as FitRequest's, so a bad query is a 422 here rather than a ValidationError (500) below
    @http.get("/fit", response_model=FitReport, tags=["fit"],
              responses=error_responses(errors.Invalid, errors.NotFound, errors.Unavailable))
    async def fit_http(model_ref: str = Query(min_length=1), context_length: int | None = Query(default=None, ge=1),
                       batch: int = Query(default=1, ge=1, le=4096),
                       dtype: str | None = None, constraint: list[str] = Query(default=[]),
                       quantize: str | None = None) -> FitReport:
        constraints = dict(placement.parse_constraint(c) for c in constraint)
        return await fit(FitRequest(model_ref=model_ref, context_length=context_length, batch=batch, dtype=dtype, quantize=quantize,
                                    constraints=constraints))

    @http.post("/deployments", response_model=DeployOutcome, status_code=201, tags=["deployments"], dependencies=admin,
               responses=error_responses((errors.Invalid, "a malformed request, or no runtime serves its architecture"), (errors.Forbidden, "the admission policy refuses this model"),
                                         errors.NotFound, (errors.Conflict, "no node has room for it, or concurrent changes did not settle"), errors.Unavailable,
                                         auth=True))
    async def deploy_http(request: DeployRequest) -> DeployOutcome:
        outcome = await deploy(request)
        if not outcome.scheduled:
            error = {"no_fit": errors.Conflict, "unsupported": errors.Invalid}.get(outcome.code or "")
            raise error(outcome.reason or "") if error else errors.from_code(outcome.code or "internal", outcome.reason or "")
        return outcome

    @http.get("/deployments", response_model=DeploymentList, tags=["deployments"], responses=starting)
    async def deployments_http() -> DeploymentList:
        return await list_deployments()

    @http.delete("/deployments/{deployment_id}", response_model=UndeployOutcome, tags=["deployments"], dependencies=admin,
                 responses=error_responses(errors.NotFound, errors.Conflict, errors.Unavailable, auth=True))
    async def undeploy_one(deployment_id: str) -> UndeployOutcome:
        return await undeploy(UndeployRequest(deployment_id=deployment_id))

    @http.delete("/deployments", response_model=UndeployOutcome, tags=["deployments"], dependencies=admin,
                 responses=error_responses(errors.Invalid, errors.NotFound, errors.Conflict, errors.Unavailable, auth=True))
    async def undeploy_model(model_ref: str) -> UndeployOutcome:
        return await undeploy(UndeployRequest(model_ref=model_ref))

    @http.get("/corrections", response_model=CorrectionList, tags=["fit"], responses=starting)
    async def corrections_http() -> CorrectionList:
        return await corrections()


def _admission_policy(config: InventoryConfig) -> AdmissionPolicy | None:
    """The policy the registry admits deployments by; PolicyFileError when the file is unusable."""
    if config.admission_policy is None:
        log.info("no admission policy configured (STRATA_ADMISSION_POLICY): every model is admitted")
        return None
    policy = load_policy(config.admission_policy)
    if policy is None:
        log.info("admission policy %s does not exist: no policy, every model is admitted", config.admission_policy)
    else:
        log.info("admission policy %s (%s): %s", policy.source, policy.digest[:19],
                 ", ".join(policy.rules.model_dump(exclude_defaults=True)) or "no rules")
    return policy


async def _watch_liveness(nodes: NodeTable, period_s: float) -> None:
    while True:
        await asyncio.sleep(max(period_s, 0.05))
        try:
            await nodes.check()
        except Exception as exc:  # NATS reconnecting: judge again at the next tick
            log.warning("liveness check failed: %s", exc)
