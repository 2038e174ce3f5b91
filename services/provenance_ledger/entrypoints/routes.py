"""The ledger's HTTP API (OpenAPI at /docs): the RPC ops of its contract as routes, over the started
LedgerApp (503 until the ledger is open). Leaf contents need a key with the 'read' scope (access.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRouter

from services.provenance_ledger.entrypoints.access import only_requests_of, receipt_caller
from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from shared import errors
from shared.apikey_http import require
from shared.apikeys import ApiKeyRecord
from shared.http_errors import error_responses
from shared.provenance import (
    AuditEntry, AuditRequest, ConsistencyProof, ConsistencyRequest, ExportRequest, HeadResponse, InclusionProof,
    InclusionRequest, LedgerStats, ModelLineageRef, Receipt, VerifyReport,
)
from shared.service import part_of

router = APIRouter()
Started = Annotated[LedgerApp, Depends(part_of(LedgerApp))]
TAGS = ["ledger"]
ADMIN = [Depends(require("admin"))]  # signing a head now
READER = [Depends(require("read"))]  # leaf contents (access.py); public material stays open
STARTING = error_responses(errors.Unavailable)  # every route answers 503 until the ledger is open
MISSING = error_responses(errors.NotFound, errors.Unavailable)
READ_MISSING = error_responses(errors.NotFound, errors.Unavailable, auth=True)


@router.get(
    "/head",
    response_model=HeadResponse,
    tags=TAGS,
    summary="current size and root, and the latest signed tree head",
    responses=STARTING,
)
async def head(app: Started) -> HeadResponse:
    return app.head()


@router.post(
    "/checkpoint",
    tags=TAGS,
    summary="sign a tree head now (and publish it as ledger.checkpoint)",
    dependencies=ADMIN,
    responses=error_responses(errors.Unavailable, auth=True),
)
async def checkpoint(app: Started) -> Any:
    return await app.checkpoint()


@router.get("/heads", tags=TAGS, summary="every signed tree head", responses=STARTING)
async def heads(app: Started) -> Any:
    return app.ledger.store.heads()


# response_class=Response, not PlainTextResponse: FastAPI documents every response of a route in the route's
# media type, and the 503 is the typed JSON error; the 200 says text/plain itself
@router.get(
    "/public-key",
    response_class=Response,
    tags=TAGS,
    summary="the Ed25519 public key (PEM) that signs tree heads",
    responses={200: {"description": "the PEM", "content": {"text/plain": {"schema": {"type": "string"}}}}, **STARTING},
)
async def public_key(app: Started) -> PlainTextResponse:
    return PlainTextResponse(app.ledger.public_key_pem)


@router.get(
    "/proof/inclusion",
    response_model=InclusionProof,
    tags=TAGS,
    responses=error_responses(errors.Invalid, errors.NotFound, errors.Unavailable),
)
async def inclusion(
    app: Started,
    index: int | None = Query(None, ge=0),
    event_id: str | None = None,
    tree_size: int | None = Query(None, ge=1),
) -> InclusionProof:
    try:
        req = InclusionRequest(index=index, event_id=event_id, tree_size=tree_size)
    except ValueError as exc:
        raise errors.Invalid(str(exc)) from None
    return app.inclusion(req)


@router.get(
    "/proof/consistency",
    response_model=ConsistencyProof,
    tags=TAGS,
    responses=error_responses(errors.Invalid, errors.Unavailable),
)
async def consistency(
    app: Started, first: int = Query(ge=0), second: int | None = Query(None, ge=0)
) -> ConsistencyProof:
    return app.consistency(ConsistencyRequest(first=first, second=second))


@router.get(
    "/leaves/{index}",
    tags=TAGS,
    summary="a stored event and its leaf hash (key with scope read)",
    dependencies=READER,
    responses=READ_MISSING,
)
async def leaf(app: Started, index: int) -> Any:
    event, h = app.ledger.leaf(index)
    return {"leaf_index": index, "leaf_hash": h.hex(), "event": event}


@router.get(
    "/receipts/{request_id}",
    response_model=Receipt,
    tags=TAGS,
    summary="an inference receipt, verifiable offline (scope read; or inference, for that key's own requests)",
    responses=READ_MISSING,
)
async def receipt(app: Started, request_id: str, caller: ApiKeyRecord | None = Depends(receipt_caller)) -> Receipt:
    return app.receipt(request_id, made_with=only_requests_of(caller))


@router.post(
    "/verify",
    response_model=VerifyReport,
    tags=TAGS,
    summary="re-hash every leaf and check every signed head",
    responses=MISSING,
)
async def verify(app: Started) -> VerifyReport:
    return await app.verify()


@router.get("/lineage/requests/{request_id}", tags=["lineage"], dependencies=READER, responses=READ_MISSING)
async def lineage(app: Started, request_id: str) -> dict[str, Any]:
    return app.request_lineage(request_id)


@router.get("/lineage/datasets/{digest}", tags=["lineage"], dependencies=READER, responses=READ_MISSING)
async def dataset(app: Started, digest: str) -> dict[str, Any]:
    return app.dataset_lineage(digest)


@router.get(
    "/lineage/models/{ref}",
    tags=["lineage"],
    dependencies=READER,
    responses=READ_MISSING,
    summary="a model version's origin (import source, or the versions it was converted from) and its derivatives",
)
async def model_lineage(app: Started, ref: str) -> dict[str, Any]:
    return app.model_lineage(ModelLineageRef(ref=ref).ref)


@router.get(
    "/audit",
    response_model=list[AuditEntry],
    tags=["lineage"],
    dependencies=READER,
    responses=error_responses(errors.Invalid, errors.Unavailable, auth=True),
)
async def audit(
    app: Started,
    since: str | None = None,
    model: str | None = None,
    type: str | None = None,
    limit: int = Query(1000, ge=1, le=100_000),
) -> list[AuditEntry]:
    return app.audit(AuditRequest(since=since, model=model, type=type, limit=limit))


@router.get(
    "/exports/{ref}",
    tags=["exports"],
    summary="in-toto Statement v1 (SLSA provenance) or CycloneDX 1.6 ML-BOM",
    dependencies=READER,
    responses=READ_MISSING,
)
async def export(
    app: Started, ref: str, format: str = Query("in-toto", pattern="^(in-toto|cyclonedx)$")
) -> dict[str, Any]:
    return app.export(ExportRequest(ref=ref, format=format))  # type: ignore[arg-type]


@router.get("/stats", response_model=LedgerStats, tags=TAGS, responses=STARTING)
async def stats(app: Started) -> LedgerStats:
    return app.stats()
