"""model-store: signed, content-addressed models and datasets. It reacts to no event.

Wiring only: open the Object Store, the KV catalog, the SQLite index and the signing key once NATS
is connected, keep the index in step with KV, serve the read RPCs and the HTTP API.
"""

from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client import Counter

from shared.catalog import (
    DatasetList, DatasetRequest, ListRequest, ModelList, PublicKey, PublicKeyRequest, ResolvedDataset, ResolvedModel,
    ResolveRequest,
)
from shared.apikey_http import protect
from shared.config import Settings, nats_store_dir
from shared.errors import Unavailable
from shared.service import Service

from services.model_store.adapters.blobs import BlobStore
from services.model_store.adapters.catalog_kv import CatalogKV
from services.model_store.adapters.index import CatalogIndex
from services.model_store.domain.signing import Signer
from services.model_store.entrypoints.http import router
from services.model_store.service_layer.handlers import ModelStore
from services.model_store.service_layer.ingest import Ingest
from services.model_store.service_layer.space import SpaceGuard

log = logging.getLogger("model-store")
INDEX_SYNC_TIMEOUT_S = 30.0


def builtin_enabled() -> bool:
    """``STRATA_MODEL_STORE_BUILTIN=0`` skips registering the built-in model at first start (tests)."""
    return os.environ.get("STRATA_MODEL_STORE_BUILTIN", "1").lower() not in ("0", "false", "no")


def create_service(settings: Settings | None = None) -> Service:
    service = Service("model-store", settings, description="Models and datasets: blobs, manifests, versions, aliases, signatures.")
    state: dict[str, object] = {}
    tasks: list[asyncio.Task[None]] = []

    def store() -> ModelStore:
        found = state.get("store")
        if found is None:
            raise Unavailable("model-store is starting: its catalog is not open yet")
        return found  # type: ignore[return-value]

    @service.on_start
    async def open_catalog() -> None:
        js = service.broker.connection.jetstream()
        kv = await CatalogKV.open(js)
        blobs = await BlobStore.open(js, create=True)
        index = CatalogIndex(service.settings.service_dir / "index.sqlite")
        signer = Signer.load_or_create(service.settings.service_dir / "signing-key.pem")
        spool_dir = service.settings.service_dir / "tmp"
        space = SpaceGuard(spool_dir, nats_store_dir(service.settings.data_dir), blobs.room)
        ingest = Ingest(kv, blobs, spool_dir, space)
        model_store = ModelStore(kv, blobs, index, signer, ingest, service.publish)
        caught_up = asyncio.Event()
        tasks.append(asyncio.create_task(_follow_catalog(kv, index, caught_up)))
        await asyncio.wait_for(caught_up.wait(), INDEX_SYNC_TIMEOUT_S)
        state["store"] = model_store
        if builtin_enabled():
            from services.model_store.service_layer.builtin import register_builtin

            tasks.append(asyncio.create_task(register_builtin(model_store)))

    @service.on_stop
    async def close_catalog() -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)  # a stop never hangs on a task that ignores its cancel
        found = state.pop("store", None)
        if isinstance(found, ModelStore):
            found.index.close()

    @service.rpc("resolve", ResolveRequest)
    async def resolve(request: ResolveRequest) -> ResolvedModel:
        return await store().resolve(request.ref)

    @service.rpc("list", ListRequest)
    async def list_models(request: ListRequest) -> ModelList:
        return await store().list_models(request.name)

    @service.rpc("datasets", ListRequest)
    async def list_datasets(_request: ListRequest) -> DatasetList:
        return await store().list_datasets()

    @service.rpc("dataset", DatasetRequest)
    async def dataset(request: DatasetRequest) -> ResolvedDataset:
        return await store().dataset(request.ref)

    @service.rpc("public_key", PublicKeyRequest)
    async def public_key(_request: PublicKeyRequest) -> PublicKey:
        return store().signer.public_key_info()

    blob_bytes = Counter("strata_model_store_blob_bytes", "Blob bytes uploaded (in) and served (out)",
                         ["service", "direction"], registry=service.metrics.registry)
    service.http.include_router(router(store, admin=protect(service).require("admin"),
                                       count_bytes=lambda d, n: blob_bytes.labels(service.name, d).inc(n)))
    service.model_store = store  # type: ignore[attr-defined]  # tests reach the use cases through it
    return service


async def _follow_catalog(kv: CatalogKV, index: CatalogIndex, caught_up: asyncio.Event) -> None:
    """Replay every KV key into the index, prune what KV no longer has, then follow changes."""
    live: set[str] = set()
    try:
        async for item in kv.watch():
            if item is None:
                if not caught_up.is_set():
                    index.prune(live)
                    caught_up.set()
                continue
            key, value = item
            if not caught_up.is_set() and value is not None:
                live.add(key)
            try:
                index.apply(key, value)
            except Exception:  # one bad entry must not stop the index following the others
                log.exception("could not index catalog key %s", key)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("catalog watch stopped")
