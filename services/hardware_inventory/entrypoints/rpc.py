"""hardware-inventory's RPC ops (shared/contracts/hardware_inventory.py names each one's handler here)."""

from __future__ import annotations

from services.hardware_inventory.service_layer.registry import Registry
from shared.assignments import Assigned, AssignedRequest
from shared.inventory import (
    CorrectionList, DeployOutcome, DeployRequest, DeploymentList, Empty, FitReport, FitRequest, NodeList,
    UndeployOutcome, UndeployRequest,
)
from shared.service import Service


async def nodes(service: Service, _request: Empty) -> NodeList:
    return await service.part(Registry).list_nodes()


async def fit(service: Service, request: FitRequest) -> FitReport:
    return await service.part(Registry).fit(request)


async def deploy(service: Service, request: DeployRequest) -> DeployOutcome:
    return await service.part(Registry).deploy(request)


async def deployments(service: Service, _request: Empty) -> DeploymentList:
    return await service.part(Registry).list_deployments()


async def undeploy(service: Service, request: UndeployRequest) -> UndeployOutcome:
    return await service.part(Registry).undeploy(request)


async def corrections(service: Service, _request: Empty) -> CorrectionList:
    return await service.part(Registry).corrections()


async def assigned(service: Service, request: AssignedRequest) -> Assigned:
    return await service.part(Registry).assigned(request)
