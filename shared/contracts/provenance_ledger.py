"""provenance-ledger's contract: a verifiable Merkle log of every event, its proofs, receipts,
lineage, audit and exports."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Consumes, Contract, RpcOp, Store
from shared.events import EventData
from shared.provenance import (
    AuditEntry, AuditRequest, ConsistencyProof, ConsistencyRequest, DatasetRef, Empty, ExportRequest, HeadResponse,
    InclusionProof, InclusionRequest, LedgerStats, ModelLineageRef, PublicKey, Receipt, RequestRef, TreeHead,
    VerifyReport,
)

SERVICE = "provenance-ledger"
_RPC = "services.provenance_ledger.entrypoints.rpc"

HEAD = RpcOp(
    SERVICE, "head", Empty, HeadResponse, f"{_RPC}:head", "size, root and the latest signed head"
)
CHECKPOINT = RpcOp(SERVICE, "checkpoint", Empty, TreeHead, f"{_RPC}:checkpoint", "sign a tree head now")
INCLUSION = RpcOp(
    SERVICE, "inclusion", InclusionRequest, InclusionProof, f"{_RPC}:inclusion", "an inclusion proof"
)
CONSISTENCY = RpcOp(
    SERVICE,
    "consistency",
    ConsistencyRequest,
    ConsistencyProof,
    f"{_RPC}:consistency",
    "a consistency proof",
)
RECEIPT = RpcOp(SERVICE, "receipt", RequestRef, Receipt, f"{_RPC}:receipt", "an inference receipt")
VERIFY = RpcOp(SERVICE, "verify", Empty, VerifyReport, f"{_RPC}:verify", "re-hash every leaf, check every head")
LINEAGE = RpcOp(SERVICE, "lineage", RequestRef, dict, f"{_RPC}:lineage", "a request's lineage")
DATASET_LINEAGE = RpcOp(
    SERVICE, "dataset_lineage", DatasetRef, dict, f"{_RPC}:dataset_lineage", "a dataset's lineage"
)
MODEL_LINEAGE = RpcOp(
    SERVICE,
    "model_lineage",
    ModelLineageRef,
    dict,
    f"{_RPC}:model_lineage",
    "a model version's origin and derivatives",
)
AUDIT = RpcOp(SERVICE, "audit", AuditRequest, list[AuditEntry], f"{_RPC}:audit", "the audit trail")
EXPORT = RpcOp(SERVICE, "export", ExportRequest, dict, f"{_RPC}:export", "in-toto or CycloneDX ML-BOM")
PUBLIC_KEY = RpcOp(
    SERVICE, "public_key", Empty, PublicKey, f"{_RPC}:public_key", "the key that signs tree heads"
)
STATS = RpcOp(SERVICE, "stats", Empty, LedgerStats, f"{_RPC}:stats", "the ledger's figures")

LOG = Consumes(
    "provenance-ledger-log",
    subjects.EVENTS_ALL,
    {EventData: "services.provenance_ledger.adapters.ingest:EventIngest.process"},
    purpose="every event, appended in batches (its own pull loop, adapters/ingest.py)",
    registered_by="services.provenance_ledger.adapters.ingest:EventIngest.start",
)

CONTRACT = Contract(
    SERVICE,
    "A tamper-evident Merkle log of every event, with receipts, lineage and exports.",
    rpc=(
        HEAD,
        CHECKPOINT,
        INCLUSION,
        CONSISTENCY,
        RECEIPT,
        VERIFY,
        LINEAGE,
        DATASET_LINEAGE,
        MODEL_LINEAGE,
        AUDIT,
        EXPORT,
        PUBLIC_KEY,
        STATS,
    ),
    consumes=(LOG,),
    stores=(Store(subjects.API_KEYS_BUCKET, "kv", purpose="API keys, read to guard leaf contents"),),
)
