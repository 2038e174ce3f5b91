"""hardware-inventory's HTTP API: the registry's RPC ops (service_layer/registry.py) as routes. Every
route answers 503 until the registry's state is open; deploys and undeploys need an admin API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.hardware_inventory.domain import placement
from services.hardware_inventory.service_layer.registry import Registry
from shared import errors
from shared.apikey_http import require
from shared.http_errors import error_responses
from shared.inventory import (
    CorrectionList, DeployOutcome, DeployRequest, DeploymentList, FitReport, FitRequest, NodeList, NodeView,
    UndeployOutcome, UndeployRequest,
)
from shared.service import part_of

router = APIRouter()
Started = Annotated[Registry, Depends(part_of(Registry))]
ADMIN = [Depends(require("admin"))]  # deploys and undeploys; reads stay open
STARTING = error_responses(errors.Unavailable)


@router.get("/nodes", response_model=NodeList, tags=["nodes"], responses=STARTING)
async def nodes_http(registry: Started) -> NodeList:
    return await registry.list_nodes()


@router.get("/nodes/{node_id}", response_model=NodeView, tags=["nodes"],
            responses=error_responses(errors.NotFound, errors.Unavailable))
async def get_node(registry: Started, node_id: str) -> NodeView:
    for view in (await registry.list_nodes()).nodes:
        if view.node.node_id == node_id:
            return view
    raise errors.NotFound(f"no node {node_id!r}")


# the same bounds as FitRequest's, so a bad query is a 422 here rather than a ValidationError (500) below
@router.get("/fit", response_model=FitReport, tags=["fit"],
            responses=error_responses(errors.Invalid, errors.NotFound, errors.Unavailable))
async def fit_http(registry: Started, model_ref: str = Query(min_length=1),
                   context_length: int | None = Query(default=None, ge=1), batch: int = Query(default=1, ge=1, le=4096),
                   dtype: str | None = None, constraint: list[str] = Query(default=[]),
                   quantize: str | None = None) -> FitReport:
    constraints = dict(placement.parse_constraint(c) for c in constraint)
    return await registry.fit(FitRequest(model_ref=model_ref, context_length=context_length, batch=batch, dtype=dtype,
                                         quantize=quantize, constraints=constraints))


@router.post(
    "/deployments",
    response_model=DeployOutcome,
    status_code=201,
    tags=["deployments"],
    dependencies=ADMIN,
    responses=error_responses(
        (errors.Invalid, "a malformed request, or no runtime serves its architecture"),
        (errors.Forbidden, "the admission policy refuses this model"),
        errors.NotFound,
        (errors.Conflict, "no node has room for it, or concurrent changes did not settle"),
        errors.Unavailable,
        auth=True,
    ),
)
async def deploy_http(registry: Started, request: DeployRequest) -> DeployOutcome:
    outcome = await registry.deploy(request)
    if not outcome.scheduled:
        error = {"no_fit": errors.Conflict, "unsupported": errors.Invalid}.get(outcome.code or "")
        raise (
            error(outcome.reason or "") if error else errors.from_code(outcome.code or "internal", outcome.reason or "")
        )
    return outcome


@router.get("/deployments", response_model=DeploymentList, tags=["deployments"], responses=STARTING)
async def deployments_http(registry: Started) -> DeploymentList:
    return await registry.list_deployments()


@router.delete(
    "/deployments/{deployment_id}",
    response_model=UndeployOutcome,
    tags=["deployments"],
    dependencies=ADMIN,
    responses=error_responses(errors.NotFound, errors.Conflict, errors.Unavailable, auth=True),
)
async def undeploy_one(registry: Started, deployment_id: str) -> UndeployOutcome:
    return await registry.undeploy(UndeployRequest(deployment_id=deployment_id))


@router.delete(
    "/deployments",
    response_model=UndeployOutcome,
    tags=["deployments"],
    dependencies=ADMIN,
    responses=error_responses(errors.Invalid, errors.NotFound, errors.Conflict, errors.Unavailable, auth=True),
)
async def undeploy_model(registry: Started, model_ref: str) -> UndeployOutcome:
    return await registry.undeploy(UndeployRequest(model_ref=model_ref))


@router.get("/corrections", response_model=CorrectionList, tags=["fit"], responses=STARTING)
async def corrections_http(registry: Started) -> CorrectionList:
    return await registry.corrections()
