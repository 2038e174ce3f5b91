"""model-store's RPC ops (shared/contracts/model_store.py names each one's handler here)."""

from __future__ import annotations

from shared.catalog import (
    DatasetList, DatasetRequest, ListRequest, ModelList, PublicKey, PublicKeyRequest, ResolvedDataset, ResolvedModel,
    ResolveRequest,
)
from shared.service import Service

from services.model_store.service_layer.handlers import ModelStore


async def resolve(service: Service, request: ResolveRequest) -> ResolvedModel:
    return await service.part(ModelStore).resolve(request.ref)


async def list_models(service: Service, request: ListRequest) -> ModelList:
    return await service.part(ModelStore).list_models(request.name)


async def list_datasets(service: Service, _request: ListRequest) -> DatasetList:
    return await service.part(ModelStore).list_datasets()


async def dataset(service: Service, request: DatasetRequest) -> ResolvedDataset:
    return await service.part(ModelStore).dataset(request.ref)


async def public_key(service: Service, _request: PublicKeyRequest) -> PublicKey:
    return service.part(ModelStore).signer.public_key_info()
