"""model-store's contract: models and datasets, their blobs and signatures. It reacts to no event."""

from __future__ import annotations

from shared import subjects
from shared.catalog import (
    DatasetList, DatasetRequest, ListRequest, ModelList, PublicKey, PublicKeyRequest, ResolvedDataset, ResolvedModel,
    ResolveRequest,
)
from shared.contracts import Contract, RpcOp, Store

SERVICE = "model-store"
_RPC = "services.model_store.entrypoints.rpc"

RESOLVE = RpcOp(SERVICE, "resolve", ResolveRequest, ResolvedModel, f"{_RPC}:resolve",
                "NAME, NAME:VERSION or NAME@ALIAS to its signed manifest")
LIST = RpcOp(SERVICE, "list", ListRequest, ModelList, f"{_RPC}:list_models", "every model (or one name's versions)")
DATASETS = RpcOp(SERVICE, "datasets", ListRequest, DatasetList, f"{_RPC}:list_datasets", "every dataset")
DATASET = RpcOp(SERVICE, "dataset", DatasetRequest, ResolvedDataset, f"{_RPC}:dataset", "one dataset's manifest")
PUBLIC_KEY = RpcOp(SERVICE, "public_key", PublicKeyRequest, PublicKey, f"{_RPC}:public_key",
                   "the key that signs manifests")

CATALOG = Store(subjects.CATALOG_BUCKET, "kv", owns=True, purpose="manifests, versions and aliases")
BLOBS = Store(subjects.BLOB_BUCKET, "object", owns=True, purpose="model and dataset files, by SHA-256",
              # The Object Store removes an object's chunks (a put that failed part-way, a replaced or deleted blob)
              # with a purge filtered to the chunks' subject. NATS cannot restrict the filter, so this lets model-store
              # purge its whole blob store: no more than its writes to the store allow.
              purges=True)
API_KEYS = Store(subjects.API_KEYS_BUCKET, "kv", purpose="API keys, read to guard the admin routes")

CONTRACT = Contract(
    SERVICE, "Signed, content-addressed models and datasets.",
    rpc=(RESOLVE, LIST, DATASETS, DATASET, PUBLIC_KEY),
    stores=(CATALOG, BLOBS, API_KEYS),
    client="services.model_store.api:StoreClient",
)
