"""model-store: signed, content-addressed models and datasets. It reacts to no event.

Wiring only: open the Object Store, the KV catalog, the SQLite index and the signing key once NATS
is connected and provide the ModelStore they make, keep the index in step with KV, serve the contract's
RPC ops (entrypoints/rpc.py) and the HTTP API (entrypoints/http.py).
"""

from __future__ import annotations

import asyncio
import logging

from shared.apikey_http import protect
from shared.config import Settings, nats_store_dir
from shared.contracts.model_store import CONTRACT, SERVICE
from shared.service import Service

from shared.blob_store import BlobStore
from services.model_store.adapters.catalog_kv import CatalogKV
from services.model_store.adapters.index import CatalogIndex
from services.model_store.adapters.metrics import BlobTraffic
from services.model_store.config import builtin_enabled
from services.model_store.domain.signing import Signer
from services.model_store.entrypoints.http import router
from services.model_store.service_layer.handlers import ModelStore
from services.model_store.service_layer.ingest import Ingest
from services.model_store.service_layer.space import SpaceGuard

log = logging.getLogger("model-store")
INDEX_SYNC_TIMEOUT_S = 30.0


def create_service(settings: Settings | None = None) -> Service:
    service = Service(
        SERVICE, settings, description="Models and datasets: blobs, manifests, versions, aliases, signatures."
    )
    tasks: list[asyncio.Task[None]] = []

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
        service.provide(model_store)
        if builtin_enabled():
            from services.model_store.service_layer.builtin import register_builtin

            tasks.append(asyncio.create_task(register_builtin(model_store)))

    @service.on_stop
    async def close_catalog() -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)  # a stop never hangs on a task that ignores its cancel
        found = service.withdraw(ModelStore)
        if found is not None:
            found.index.close()

    service.serve(CONTRACT)
    protect(service)
    service.provide(BlobTraffic(service.name, service.metrics.registry))
    service.http.include_router(router)
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
