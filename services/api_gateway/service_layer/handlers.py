"""The gateway's use cases: authenticate a caller (shared/apikey_http.py), admit a request under the
in-flight limit, hold it to its key's quotas (service_layer/metering.py), and run it through the
shared inference client (one definition of the NATS protocol, shared with the CLI)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nats.aio.client import Client

from shared import errors, inference_client
from shared.apikey_http import KeyAuth
from shared.apikeys import ApiKeyRecord
from shared.inference import Chunk, End, InferenceReply, InferenceRequest, Started

from services.api_gateway.domain.errors import ModelNotDeployed, Overloaded
from services.api_gateway.domain.responses import ModelCard, ModelList, now
from services.api_gateway.config import NATS_HEADROOM_BYTES, GatewayConfig
from services.api_gateway.service_layer.metering import Metering

Message = Started | Chunk | End


@dataclass
class Caller:
    key: ApiKeyRecord | None  # None in open mode

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None


class Slot:
    """One admitted request; released exactly once, however the request ends."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway, self._held = gateway, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gateway.in_flight -= 1


class Gateway:
    def __init__(self, config: GatewayConfig, connection: Callable[[], Client], auth: KeyAuth) -> None:
        self.config = config
        self._connection = connection
        self.auth = auth
        self.metering = Metering(config.quota_max_tokens)
        self.in_flight = 0

    @property
    def nc(self) -> Client:
        return self._connection()

    # -- auth, quotas and admission ----------------------------------------------------------------
    async def authenticate(self, key: str | None) -> Caller:
        """The caller (401 / 403 as every service answers them). Its quotas are taken per route, once
        the request's size is known (``metering``)."""
        return Caller(key=await self.auth.check(key, "inference"))

    def body_limit(self) -> int:
        """The largest body accepted: the configured one, and never more than fits, with the request's own
        fields, in one NATS message (the server's max_payload); a bigger one could never be sent."""
        try:
            max_payload = self.nc.max_payload
        except Exception:  # not connected yet: the request will be answered 503 by the next step anyway
            max_payload = 0
        if not max_payload:
            return self.config.max_body_bytes
        return max(1024, min(self.config.max_body_bytes, max_payload - NATS_HEADROOM_BYTES))

    def check_body_size(self, size: int) -> None:
        """413 for a body over ``body_limit``, naming the limit: retrying it can never help."""
        limit = self.body_limit()
        if size > limit:
            raise errors.TooLarge(
                f"the request body is {size} bytes; this gateway accepts at most {limit} bytes "
                "(STRATA_API_GATEWAY_MAX_BODY_BYTES): shorten the prompt"
            )

    def admit(self) -> Slot:
        if self.in_flight >= self.config.max_in_flight:
            raise Overloaded(
                f"the gateway is at its limit of {self.config.max_in_flight} requests in flight; retry shortly"
            )
        self.in_flight += 1
        return Slot(self)

    # -- use cases ---------------------------------------------------------------------------------
    async def list_models(self, caller: Caller) -> ModelList:
        await self.metering.admit(caller.key)
        created = now()
        models = await inference_client.deployed_models(self.nc)
        return ModelList(data=[ModelCard(id=m.name, created=created, max_model_len=m.max_model_len) for m in models])

    async def retrieve_model(self, caller: Caller, model_id: str) -> ModelCard:
        """One deployed model, as ``list_models`` gives it; 404 ``model_not_found`` when none serves it."""
        for card in (await self.list_models(caller)).data:
            if card.id == model_id:
                return card
        raise ModelNotDeployed(f"The model '{model_id}' does not exist or is not deployed")

    async def complete(self, request: InferenceRequest) -> InferenceReply:
        try:
            return await inference_client.complete(
                self.nc,
                request,
                silence_timeout_s=self.config.silence_timeout_s,
                deadline_s=self.config.request_timeout_s,
            )
        except errors.NotFound as exc:
            raise ModelNotDeployed(exc.message) from None

    async def open_stream(self, request: InferenceRequest) -> tuple[Started, AsyncIterator[Message]]:
        """Send a streaming request and wait for the worker to take it, so that not-deployed,
        overloaded and invalid answers still get their own HTTP status; then the rest streams."""
        stream = inference_client.stream(
            self.nc,
            request,
            silence_timeout_s=self.config.silence_timeout_s,
            deadline_s=self.config.request_timeout_s,
        )
        try:
            first = await anext(stream)
        except errors.NotFound as exc:
            raise ModelNotDeployed(exc.message) from None
        except StopAsyncIteration:
            raise inference_client.WorkerLost(
                f"the worker ended request {request.request_id} without answering"
            ) from None
        if not isinstance(first, Started):
            await stream.aclose()  # type: ignore[attr-defined]
            raise inference_client.WorkerLost(f"the worker answered request {request.request_id} before starting it")
        return first, stream
