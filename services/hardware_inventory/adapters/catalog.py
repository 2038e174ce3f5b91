"""Model metadata from model-store: ``rpc.model-store.resolve`` behind a small interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client

from shared import rpc, subjects
from shared.catalog import SERVICE as MODEL_STORE
from shared.catalog import ResolvedModel, ResolveRequest


class ModelCatalog(Protocol):
    async def resolve(self, ref: str) -> ResolvedModel:
        """The model version a ref names; raises shared.errors.NotFound, Invalid or Unavailable."""
        ...


class RpcModelCatalog:
    def __init__(self, connection: Callable[[], Client], timeout_s: float = 5.0) -> None:
        self._connection = connection
        self.timeout_s = timeout_s

    async def resolve(self, ref: str) -> ResolvedModel:
        return await rpc.call(self._connection(), subjects.rpc(MODEL_STORE, "resolve"), ResolveRequest(ref=ref),
                              ResolvedModel, timeout=self.timeout_s)
