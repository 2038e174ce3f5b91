"""``POST /v1/embeddings``: admit the request under the gateway's in-flight limit, hold it to its key's
quotas (a reservation bounded by its inputs' size, settled with the tokens the worker counted), and
run it over NATS (shared/embeddings.py).

A request that fails after a worker took it (it died, a time-out) keeps its whole reservation: the
worker's ``inference.embedded`` is a receipt for the ledger, and this gateway does not listen for it
(embeddings are short and their bound is close to what they use)."""

from __future__ import annotations

import asyncio

from shared import embeddings, errors

from services.api_gateway.domain.embeddings import EmbeddingsRequest, render
from services.api_gateway.domain.errors import InputTooLong, ModelNotDeployed
from services.api_gateway.service_layer.handlers import Caller, Gateway
from services.api_gateway.service_layer.metering import ran_nothing

OFF_LOOP_FLOATS = 1 << 16  # ~20 ms of writing floats: beyond it, a thread (base64 is ~10x cheaper)


async def embed(gateway: Gateway, caller: Caller, body: EmbeddingsRequest, request_id: str,
                client_request_id: str | None) -> tuple[bytes, str | None]:
    """The response's JSON and the salt of the inputs' commitment in the worker's event (for the caller alone)."""
    request = body.to_strata(request_id, caller.key_id, client_request_id)
    slot = gateway.admit()
    try:
        hold = await gateway.metering.reserve_tokens(caller.key, request_id, body.token_bound())
        try:
            result = await embeddings.embed(gateway.nc, request, silence_timeout_s=gateway.config.silence_timeout_s,
                                            deadline_s=gateway.config.request_timeout_s)
        except BaseException as exc:
            if ran_nothing(exc):
                await gateway.metering.settle(hold, 0)
            else:
                gateway.metering.settle_from_event(hold)
            if isinstance(exc, errors.NotFound) and not isinstance(exc, ModelNotDeployed):
                raise ModelNotDeployed(exc.message) from None
            if isinstance(exc, errors.ContextLengthExceeded):
                raise InputTooLong(exc.message) from None
            raise
        await gateway.metering.settle(hold, result.reply.prompt_tokens)
        return await _json(result, body), result.reply.prompt_salt
    finally:
        slot.release()


async def _json(result: embeddings.Embeddings, body: EmbeddingsRequest) -> bytes:
    """The response body. Floats as JSON text are the costly part (2048 vectors of 1024: ~0.6 s of CPU,
    41 MB): a large one is written on a thread, not on the event loop every other request shares."""
    def write() -> bytes:
        return render(result, body.model, body.encoding_format).model_dump_json().encode()

    floats = result.reply.count * result.reply.dimensions
    if body.encoding_format == "float" and floats > OFF_LOOP_FLOATS:
        return await asyncio.to_thread(write)
    return write()

