"""model-store's HTTP API (OpenAPI at /docs). Uploads and downloads stream: a request body is read
with ``request.stream()`` chunk by chunk, a blob goes out as its Object Store chunks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from shared.catalog import (
    AliasRequest, AliasResult, DatasetList, DeleteResult, ModelList, PublicKey, PushDatasetRequest, PushedDataset,
    PushedModel, PushModelRequest, ResolvedDataset, ResolvedModel,
)
from shared.errors import BlobCorrupt, Conflict, InsufficientStorage, Invalid, NotFound, Unavailable
from shared.apikey_http import require
from shared.http_errors import error_responses
from shared.service import part_of

from services.model_store.adapters.catalog_kv import BlobInfo
from services.model_store.adapters.metrics import BlobTraffic
from services.model_store.service_layer.handlers import ModelStore
from services.model_store.service_layer.ingest import check_digest

log = logging.getLogger("model-store")


class BlobUploaded(BaseModel):
    sha256: str
    size: int
    info: BlobInfo


class BlobChecked(BaseModel):
    """The blob read through whole and matches the store's record of it (its size, chunks and digest)."""

    sha256: str
    size: int


# Routes over the ModelStore the service provides once NATS is connected (503 until then). Every route
# that changes the store needs an admin API key; reads stay open.
router = APIRouter(prefix="/v1", tags=["model-store"])
Store = Annotated[ModelStore, Depends(part_of(ModelStore))]
Traffic = Annotated[BlobTraffic, Depends(part_of(BlobTraffic))]


def guarded(*errors: Any) -> dict[str, Any]:
    """An admin route: the API-key dependency, and its statuses with those of ``errors``."""
    return {"dependencies": [Depends(require("admin"))], "responses": error_responses(*errors, Unavailable, auth=True)}



@router.get("/public-key", response_model=PublicKey, responses=error_responses(Unavailable))
async def public_key(store: Store) -> PublicKey:
    return store.signer.public_key_info()



@router.head("/blobs/{sha256}", responses=error_responses(Invalid, NotFound, Unavailable))
async def has_blob(store: Store, sha256: str) -> Response:
    check_digest(sha256)
    size = await store.blobs.size(sha256)
    if size is None:
        return Response(status_code=404)
    return Response(headers={"x-blob-size": str(size)})



@router.get("/blobs/{sha256}/check", response_model=BlobChecked,
         responses=error_responses(Invalid, NotFound, BlobCorrupt, Unavailable))
async def check_blob(store: Store, sha256: str) -> BlobChecked:
    """Read the stored blob through and check it against the store's record of it (clients ask
    after a download broke off, to learn whether the blob is corrupt or the connection failed)."""
    check_digest(sha256)
    return BlobChecked(sha256=sha256, size=await store.blobs.check(sha256))



@router.put("/blobs/{sha256}", response_model=BlobUploaded, **guarded(Invalid, InsufficientStorage))
async def upload_blob(
    store: Store, traffic: Traffic, sha256: str, request: Request, path: str | None = Query(default=None)
) -> BlobUploaded:
    """Stream a blob in as the raw request body; ``path`` (its file name) lets it be checked now.
    With a content-length, a blob there is no room for is refused (507) before its body is read."""
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    info = await store.ingest.upload(sha256, request.stream(), path, declared_size=declared)
    traffic.count("in", info.size)
    return BlobUploaded(sha256=sha256, size=info.size, info=info)


@router.get("/blobs/{sha256}", responses=error_responses(Invalid, NotFound, BlobCorrupt, Unavailable))
async def download_blob(store: Store, traffic: Traffic, sha256: str) -> StreamingResponse:
    check_digest(sha256)
    return await _stream(store, sha256, traffic.count)


@router.post("/models", response_model=PushedModel, **guarded(Invalid, NotFound, Conflict))
async def push_model(store: Store, body: PushModelRequest, response: Response) -> PushedModel:
    pushed = await store.register_model(body)
    response.status_code = 201 if pushed.created else 200
    return pushed


@router.get("/models", response_model=ModelList, responses=error_responses(Unavailable))
async def list_models(store: Store, name: str | None = None) -> ModelList:
    return await store.list_models(name)


@router.get("/models/{ref}", response_model=ResolvedModel, responses=error_responses(Invalid, NotFound, Unavailable))
async def show_model(store: Store, ref: str) -> ResolvedModel:
    """Resolve NAME, NAME:VERSION or NAME@ALIAS to its signed manifest."""
    return await store.resolve(ref)


@router.get("/resolve", response_model=ResolvedModel, responses=error_responses(Invalid, NotFound, Unavailable))
async def resolve(store: Store, ref: str) -> ResolvedModel:
    return await store.resolve(ref)


@router.get("/models/{ref}/files/{path:path}", responses=error_responses(Invalid, NotFound, BlobCorrupt, Unavailable))
async def download_file(store: Store, traffic: Traffic, ref: str, path: str) -> StreamingResponse:
    resolved = await store.resolve(ref)
    entry = next((f for f in resolved.manifest.files if f.path == path), None)
    if entry is None:
        raise NotFound(f"{resolved.model.name}:{resolved.model.version} has no file {path!r}")
    return await _stream(store, entry.sha256, traffic.count)


@router.delete("/models/{ref}", response_model=DeleteResult, **guarded(Invalid, NotFound))
async def delete_model(store: Store, ref: str, all_versions: bool = False) -> DeleteResult:
    return await store.delete(ref, all_versions=all_versions)


@router.post("/aliases", response_model=AliasResult, **guarded(Invalid, NotFound, Conflict))
async def set_alias(store: Store, body: AliasRequest) -> AliasResult:
    return await store.set_alias(body.ref, body.alias)


@router.delete("/models/{name}/aliases/{alias}", status_code=204, **guarded(Invalid, NotFound))
async def remove_alias(store: Store, name: str, alias: str) -> Response:
    await store.remove_alias(name, alias)
    return Response(status_code=204)


@router.post("/datasets", response_model=PushedDataset, **guarded(Invalid, NotFound))
async def push_dataset(store: Store, body: PushDatasetRequest, response: Response) -> PushedDataset:
    pushed = await store.register_dataset(body)
    response.status_code = 201 if pushed.created else 200
    return pushed


@router.get("/datasets", response_model=DatasetList, responses=error_responses(Unavailable))
async def list_datasets(store: Store) -> DatasetList:
    return await store.list_datasets()


@router.get("/datasets/{ref}", response_model=ResolvedDataset, responses=error_responses(NotFound, Unavailable))
async def show_dataset(store: Store, ref: str) -> ResolvedDataset:
    return await store.dataset(ref)


async def _stream(store: ModelStore, sha256: str, count_bytes: Callable[[str, int], None]) -> StreamingResponse:
    size = await store.blobs.size(sha256)
    if size is None:
        raise NotFound(f"blob sha256:{sha256} is not in the store")
    chunks = store.blobs.chunks(sha256)
    # The first chunk is read before the answer starts, so what is found by then (a missing chunk, a
    # one-chunk blob that fails its digest) is answered as a typed error with its status.
    first = await anext(chunks, b"")

    async def body() -> AsyncIterator[bytes]:
        yield first
        count_bytes("out", len(first))
        try:
            async for chunk in chunks:
                yield chunk
                count_bytes("out", len(chunk))
        except BlobCorrupt as exc:
            # The status has gone out: raising here makes the server end the connection short of
            # content-length, so the client sees a broken download, never a short 200 (the store
            # holds back a corrupt blob's last chunk). GET /v1/blobs/{sha256}/check then says why.
            log.error("aborted the download: %s", exc.message)
            raise
        finally:
            await chunks.aclose()  # its pull consumer goes now, not at garbage collection

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"content-length": str(size), "x-content-sha256": sha256},
    )
