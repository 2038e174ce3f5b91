"""The ledger's RPC ops (shared/contracts/provenance_ledger.py names each one's handler here). Over
NATS the credentials guard them, not API keys (docs/operations.md)."""

from __future__ import annotations

from typing import Any

from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from shared.provenance import (
    AuditRequest, ConsistencyProof, ConsistencyRequest, DatasetRef, Empty, ExportRequest, HeadResponse, InclusionProof,
    InclusionRequest, LedgerStats, ModelLineageRef, PublicKey, Receipt, RequestRef, VerifyReport,
)
from shared.service import Service


async def head(service: Service, _: Empty) -> HeadResponse:
    return service.part(LedgerApp).head()


async def checkpoint(service: Service, _: Empty) -> Any:
    return await service.part(LedgerApp).checkpoint()


async def inclusion(service: Service, req: InclusionRequest) -> InclusionProof:
    return service.part(LedgerApp).inclusion(req)


async def consistency(service: Service, req: ConsistencyRequest) -> ConsistencyProof:
    return service.part(LedgerApp).consistency(req)


async def receipt(service: Service, req: RequestRef) -> Receipt:
    return service.part(LedgerApp).receipt(req.request_id)


async def verify(service: Service, _: Empty) -> VerifyReport:
    return await service.part(LedgerApp).verify()


async def lineage(service: Service, req: RequestRef) -> dict[str, Any]:
    return service.part(LedgerApp).request_lineage(req.request_id)


async def dataset_lineage(service: Service, req: DatasetRef) -> dict[str, Any]:
    return service.part(LedgerApp).dataset_lineage(req.digest)


async def model_lineage(service: Service, req: ModelLineageRef) -> dict[str, Any]:
    return service.part(LedgerApp).model_lineage(req.ref)


async def audit(service: Service, req: AuditRequest) -> list[dict[str, Any]]:
    return [e.model_dump() for e in service.part(LedgerApp).audit(req)]


async def export(service: Service, req: ExportRequest) -> dict[str, Any]:
    return service.part(LedgerApp).export(req)


async def public_key(service: Service, _: Empty) -> PublicKey:
    return service.part(LedgerApp).public_key()


async def stats(service: Service, _: Empty) -> LedgerStats:
    return service.part(LedgerApp).stats()
