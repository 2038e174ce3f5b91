"""The registry's queries and commands: one method per RPC op of hardware-inventory's contract
(shared/contracts/hardware_inventory.py); its HTTP routes (entrypoints/routes.py) call the same
methods. Built once the KV state is open, and provided to the service as one part."""

from __future__ import annotations

from dataclasses import dataclass

from services.hardware_inventory.adapters.state import InventoryState
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.domain import placement
from services.hardware_inventory.domain.policy import AdmissionPolicy
from services.hardware_inventory.service_layer.deployments import Deployments
from services.hardware_inventory.service_layer.nodes import NodeTable
from services.hardware_inventory.service_layer.views import node_view
from shared.assignments import Assigned, AssignedRequest
from shared.inventory import (
    CorrectionList, DeployOutcome, DeployRequest, DeploymentList, FitReport, FitRequest, NodeList, UndeployOutcome,
    UndeployRequest,
)


@dataclass
class Registry:
    config: InventoryConfig
    state: InventoryState
    nodes: NodeTable
    deployments: Deployments
    admission: AdmissionPolicy | None = None

    async def list_nodes(self) -> NodeList:
        allocations = await self.state.allocations()
        records = await self.state.nodes()
        slots = placement.slots(records, allocations, self.nodes.telemetry, self.config.utilisation_cap)
        now = self.nodes.clock()
        return NodeList(nodes=[
            node_view(n, self.nodes.telemetry.get(n.node_id), now,
                      {d.id: allocations.booked(n.node_id, d.id) for d in n.devices},
                      {s.device.id: s.available for s in slots if s.node.node_id == n.node_id})
            for n in records
        ])

    async def fit(self, request: FitRequest) -> FitReport:
        return await self.deployments.fit(request)

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        return await self.deployments.deploy(request)

    async def list_deployments(self) -> DeploymentList:
        return DeploymentList(
            deployments=sorted((await self.state.allocations()).deployments.values(), key=lambda d: d.created)
        )

    async def undeploy(self, request: UndeployRequest) -> UndeployOutcome:
        return UndeployOutcome(released=await self.deployments.undeploy(request.model_ref, request.deployment_id))

    async def corrections(self) -> CorrectionList:
        return CorrectionList(corrections=sorted(await self.state.corrections(), key=lambda c: c.key))

    async def assigned(self, request: AssignedRequest) -> Assigned:
        return Assigned(scheduled=await self.deployments.assigned(request.node_id))
