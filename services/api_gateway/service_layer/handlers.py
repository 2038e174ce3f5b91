"""The gateway's use cases: authenticate a caller, admit a request under the in-flight limit, and run
it through the shared inference client (one definition of the NATS protocol, shared with the CLI)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from pydantic import BaseModel, Field

from shared import errors, inference_client
from shared.inference import SILENCE_TIMEOUT_S, Chunk, End, InferenceReply, InferenceRequest, Started

from services.api_gateway.adapters.key_store import KeyStore
from services.api_gateway.domain.errors import ModelNotDeployed, Overloaded
from services.api_gateway.domain.keys import bearer_token, hash_key
from services.api_gateway.domain.responses import ModelCard, ModelList, now

log = logging.getLogger("api-gateway")
Message = Started | Chunk | End


class GatewayConfig(BaseModel):
    """Read from ``STRATA_API_GATEWAY_*`` (and ``STRATA_API_KEYS``) by ``from_env``."""

    max_in_flight: int = Field(default=64, ge=1, description="requests carried at once; more get 429")
    request_timeout_s: float = Field(default=600.0, gt=0, description="the longest a whole request may take (504)")
    silence_timeout_s: float = Field(default=SILENCE_TIMEOUT_S, gt=0, description="a worker silent this long is dead (502)")
    seed_keys: list[str] = Field(default=[], description="raw keys to register at start (STRATA_API_KEYS)")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for field, var in (("max_in_flight", "STRATA_API_GATEWAY_MAX_IN_FLIGHT"),
                           ("request_timeout_s", "STRATA_API_GATEWAY_REQUEST_TIMEOUT_S"),
                           ("silence_timeout_s", "STRATA_API_GATEWAY_SILENCE_TIMEOUT_S")):
            if env.get(var):
                values[field] = env[var]
        values["seed_keys"] = [k.strip() for k in env.get("STRATA_API_KEYS", "").split(",") if k.strip()]
        return cls.model_validate(values)


@dataclass
class Caller:
    key_name: str | None  # None in open mode


class Slot:
    """One admitted request; released exactly once, however the request ends."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway, self._held = gateway, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gateway.in_flight -= 1


class Gateway:
    def __init__(self, config: GatewayConfig, connection: Callable[[], Client]) -> None:
        self.config = config
        self._connection = connection
        self.keys: KeyStore | None = None
        self.in_flight = 0

    @property
    def nc(self) -> Client:
        return self._connection()

    async def start(self, keys: KeyStore) -> None:
        self.keys = keys
        seeded = await keys.seed(self.config.seed_keys)
        if seeded:
            log.info("registered %d API key(s) from STRATA_API_KEYS", seeded)
        if await self.open_mode():
            log.warning("NO API KEY IS CONFIGURED: the gateway is OPEN and answers anyone. Set STRATA_API_KEYS "
                        "(or create a key) before exposing it beyond this machine.")

    async def open_mode(self) -> bool:
        return self.keys is None or await self.keys.is_empty()

    # -- auth and admission ----------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Caller:
        try:
            return await self._authenticate(bearer_token(authorization))
        except NatsError as exc:  # the key store is in JetStream: without NATS nothing can be served anyway
            raise errors.Unavailable(f"NATS is not reachable, so the API key cannot be checked ({type(exc).__name__})") from None

    async def _authenticate(self, key: str | None) -> Caller:
        if key is not None and self.keys is not None:
            record = await self.keys.get(hash_key(key))
            if record is not None:
                if record.revoked:
                    raise errors.Unauthorized("this API key was revoked")
                return Caller(key_name=record.name)
        if await self.open_mode():
            return Caller(key_name=None)
        if key is None:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        raise errors.Unauthorized("incorrect API key provided")

    def admit(self) -> Slot:
        if self.in_flight >= self.config.max_in_flight:
            raise Overloaded(f"the gateway is at its limit of {self.config.max_in_flight} requests in flight; retry shortly")
        self.in_flight += 1
        return Slot(self)

    # -- use cases ---------------------------------------------------------------------------------
    async def list_models(self) -> ModelList:
        created = now()
        models = await inference_client.deployed_models(self.nc)
        return ModelList(data=[ModelCard(id=m.name, created=created) for m in models])

    async def complete(self, request: InferenceRequest) -> InferenceReply:
        try:
            return await inference_client.complete(
                self.nc, request, silence_timeout_s=self.config.silence_timeout_s, deadline_s=self.config.request_timeout_s,
            )
        except errors.NotFound as exc:
            raise ModelNotDeployed(exc.message) from None

    async def open_stream(self, request: InferenceRequest) -> tuple[Started, AsyncIterator[Message]]:
        """Send a streaming request and wait for the worker to take it, so that not-deployed,
        overloaded and invalid answers still get their own HTTP status; then the rest streams."""
        stream = inference_client.stream(
            self.nc, request, silence_timeout_s=self.config.silence_timeout_s, deadline_s=self.config.request_timeout_s,
        )
        try:
            first = await anext(stream)
        except errors.NotFound as exc:
            raise ModelNotDeployed(exc.message) from None
        except StopAsyncIteration:
            raise inference_client.WorkerLost(f"the worker ended request {request.request_id} without answering") from None
        if not isinstance(first, Started):
            await stream.aclose()  # type: ignore[attr-defined]
            raise inference_client.WorkerLost(f"the worker answered request {request.request_id} before starting it")
        return first, stream
