"""hardware-inventory: nodes, devices, the memory-fit model, and placement of deployments.

One codebase, two roles (``STRATA_INVENTORY_ROLES=agent,registry``, both by default): the agent
probes this machine and sends heartbeats; the registry keeps the node table and the bookings in the
JetStream KV bucket and places deployments. Wiring only: the handlers are entrypoints/rpc.py,
routes.py and events.py (shared/contracts/hardware_inventory.py names each), over service_layer/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Histogram

from services.hardware_inventory.adapters.catalog import ModelCatalog, RpcModelCatalog
from services.hardware_inventory.adapters.policy_file import load_policy
from services.hardware_inventory.adapters.probe import ProbeSource, StaticProbe, SystemProbe
from services.hardware_inventory.adapters.state import InventoryState
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.domain.policy import AdmissionPolicy, PolicyFileError
from services.hardware_inventory.entrypoints.routes import router
from services.hardware_inventory.service_layer.agent import Agent
from services.hardware_inventory.service_layer.deployments import Deployments
from services.hardware_inventory.service_layer.nodes import NodeTable
from services.hardware_inventory.service_layer.registry import Registry
from shared.apikey_http import protect
from shared.config import Settings
from shared.contracts import hardware_inventory as contract
from shared.service import Service

log = logging.getLogger(__name__)
NAME = contract.SERVICE


def create_service(settings: Settings | None = None) -> Service:
    try:
        return create_inventory(settings, InventoryConfig.from_env())
    except (
        PolicyFileError
    ) as exc:  # the process stops here, before it connects: one line that names the file and the key
        raise SystemExit(f"{NAME}: {exc.message}") from None


def create_inventory(
    settings: Settings | None,
    config: InventoryConfig,
    *,
    probe: ProbeSource | None = None,
    catalog: ModelCatalog | None = None,
) -> Service:
    service = Service(NAME, settings, description="Nodes, devices, memory fit and placement.")
    service.provide(config)
    if "registry" in config.roles:
        admission = _admission_policy(config)
        if admission is not None:
            service.provide(admission)
        _registry(
            service,
            config,
            admission,
            catalog or RpcModelCatalog(lambda: service.broker.connection, config.rpc_timeout_s),
        )
    if "agent" in config.roles:
        source = probe or (
            StaticProbe(config.probe_file)
            if config.probe_file
            else SystemProbe(service.settings.data_dir, config.labels)
        )
        agent = Agent(source, service.settings.node_id, service.publish, config.heartbeat_interval_s)
        service.provide(agent)
        service.subscribe(contract.AGENT_DEPLOYS, title="agent-deploys")
        service.on_start(agent.start)
        service.on_stop(agent.stop)
    return service


def _registry(
    service: Service, config: InventoryConfig, admission: AdmissionPolicy | None, catalog: ModelCatalog
) -> None:
    service.consume_declared(contract.CONTRACT)  # deploy events, and the nodes' first heartbeats: a durable each
    service.subscribe(contract.HEARTBEATS, title="heartbeats")  # no queue: every replica hears every beat
    fit_error = Histogram(
        "strata_inventory_booked_to_measured_ratio",
        "Memory booked for each loaded replica over its measured peak (under 1: booked too little)",
        ["service", "architecture", "device_kind"],
        buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 1, 1.02, 1.05, 1.1, 1.2, 1.5, 2),
        registry=service.metrics.registry,
    )
    tasks: list[asyncio.Task[None]] = []

    @service.on_start
    async def open_state() -> None:
        state = await InventoryState.open(service.broker.connection.jetstream(), config.bucket)
        nodes = NodeTable(state, service.publish, config.missed_beats)
        deployments = Deployments(state, nodes, catalog, service.publish, config, admission)
        deployments.on_measured.append(lambda arch, kind, ratio: fit_error.labels(NAME, arch, kind).observe(ratio))
        nodes.on_lost.append(deployments.node_lost)
        nodes.on_available.append(deployments.reconcile)
        service.provide(Registry(config, state, nodes, deployments, admission))
        tasks.append(asyncio.create_task(_watch_liveness(nodes, config.heartbeat_interval_s / 2)))

    @service.on_stop
    async def stop_tasks() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()

    service.serve(contract.CONTRACT)
    protect(service)
    service.http.include_router(router)


def _admission_policy(config: InventoryConfig) -> AdmissionPolicy | None:
    """The policy the registry admits deployments by; PolicyFileError when the file is unusable."""
    if config.admission_policy is None:
        log.info("no admission policy configured (STRATA_ADMISSION_POLICY): every model is admitted")
        return None
    policy = load_policy(config.admission_policy)
    if policy is None:
        log.info("admission policy %s does not exist: no policy, every model is admitted", config.admission_policy)
    else:
        log.info(
            "admission policy %s (%s): %s",
            policy.source,
            policy.digest[:19],
            ", ".join(policy.rules.model_dump(exclude_defaults=True)) or "no rules",
        )
    return policy


async def _watch_liveness(nodes: NodeTable, period_s: float) -> None:
    while True:
        await asyncio.sleep(max(period_s, 0.05))
        try:
            await nodes.check()
        except Exception as exc:  # NATS reconnecting: judge again at the next tick
            log.warning("liveness check failed: %s", exc)
