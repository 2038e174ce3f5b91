"""The ledger's request and response bodies moved to service_layer/views.py; this name stays for the
CLI (cli/ledger.py) until it takes them from the contract."""

from services.provenance_ledger.service_layer.views import (
    AuditEntry, AuditRequest, ConsistencyProof, ConsistencyRequest, DatasetRef, Empty, ExportRequest, HeadResponse,
    InclusionProof, InclusionRequest, LedgerStats, ModelLineageRef, PublicKey, RequestRef,
)

__all__ = ["AuditEntry", "AuditRequest", "ConsistencyProof", "ConsistencyRequest", "DatasetRef", "Empty", "ExportRequest",
           "HeadResponse", "InclusionProof", "InclusionRequest", "LedgerStats", "ModelLineageRef", "PublicKey", "RequestRef"]
