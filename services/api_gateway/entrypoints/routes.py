"""The gateway's HTTP routes, OpenAI's: the models, chat and text completions, embeddings, and its own
/healthz. Each reads the started Gateway (service_layer/handlers.py) and calls it; the inference routes
are solved by hand (callers.SolvedByHand), and answered by serving.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace

from shared.apikey_http import AuthMode
from shared.inference import InferenceRequest
from shared.prompt_commitment import SALT_HEADER
from shared.service import Health, Service, service_of

from services.api_gateway.domain.embeddings import EmbeddingsRequest, EmbeddingsResponse
from services.api_gateway.domain.requests import ChatCompletionRequest, CompletionRequest
from services.api_gateway.domain.responses import ChatCompletion, Completion, ErrorBody, ModelCard, ModelList
from services.api_gateway.entrypoints.callers import (
    REQUEST_ID_HEADER,
    SolvedByHand,
    caller,
    id_headers,
    started_gateway,
)
from services.api_gateway.entrypoints.serving import serve_completion, unless_disconnected
from services.api_gateway.service_layer import embeddings
from services.api_gateway.service_layer.handlers import Caller, Gateway

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d}
    for s, d in (
        (
            400,
            "invalid request; code context_length_exceeded: the prompt, or the prompt plus max_tokens, is over the "
            "model's context (the message names both numbers)",
        ),
        (401, "missing, unknown or revoked API key"),
        (403, "the API key lacks the 'inference' scope"),
        (404, "model not deployed"),
        (413, "the body is over the gateway's limit (the message names it); do not retry it"),
        (
            429,
            "the API key is over its requests_per_minute or tokens_per_minute quota, or the gateway is "
            "overloaded (Retry-After: whole seconds)",
        ),
        (502, "the worker died"),
        (503, "workers overloaded, or the quota counters out of reach for a key with a quota (Retry-After)"),
        (504, "timed out"),
    )
}

health_router = APIRouter()  # replaces Service's /healthz (app.py drops that one first)
models_router = APIRouter()
inference_router = APIRouter(route_class=SolvedByHand)  # endpoints take (body, request, caller, gateway)
StartedGateway = Depends(started_gateway)


class GatewayHealth(Health):
    auth: AuthMode
    in_flight: int
    max_in_flight: int


# /healthz (open) also says whether the gateway is open (no API key configured) and how loaded it is. (A comment,
# not a docstring: FastAPI would publish a docstring as the operation's description.)
@health_router.get("/healthz", response_model=GatewayHealth, tags=["health"])
async def health(service: Service = Depends(service_of), gateway: Gateway = StartedGateway) -> JSONResponse:
    base = service.health()
    body = GatewayHealth(
        **base.model_dump(),
        auth=await gateway.auth.mode(),
        in_flight=gateway.in_flight,
        max_in_flight=gateway.config.max_in_flight,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if base.status == "ok" else 503)


@models_router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS, tags=["openai"])
async def list_models(
    request: Request, response: Response, c: Caller = Depends(caller), gateway: Gateway = StartedGateway
) -> ModelList:
    response.headers.update(id_headers(request))
    return await gateway.list_models(c)


@models_router.get("/v1/models/{model_id}", response_model=ModelCard, responses=OPENAI_ERRORS, tags=["openai"])
async def retrieve_model(
    model_id: str, request: Request, response: Response, c: Caller = Depends(caller), gateway: Gateway = StartedGateway
) -> ModelCard:
    response.headers.update(id_headers(request))
    return await gateway.retrieve_model(c, model_id)


@inference_router.post("/v1/chat/completions", response_model=ChatCompletion, responses=OPENAI_ERRORS, tags=["openai"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, c: Caller = Depends(caller), gateway: Gateway = StartedGateway
) -> Response:
    return await serve_completion(
        gateway, request, c, _inference_of(body, request, c), body.model, "chat", body.include_usage
    )


@inference_router.post("/v1/completions", response_model=Completion, responses=OPENAI_ERRORS, tags=["openai"])
async def completions(
    body: CompletionRequest, request: Request, c: Caller = Depends(caller), gateway: Gateway = StartedGateway
) -> Response:
    return await serve_completion(
        gateway,
        request,
        c,
        _inference_of(body, request, c),
        body.model,
        "text_completion",
        body.include_usage,
        echo=body.echo,
    )


@inference_router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=OPENAI_ERRORS, tags=["openai"])
async def create_embeddings(
    body: EmbeddingsRequest, request: Request, c: Caller = Depends(caller), gateway: Gateway = StartedGateway
) -> Response:
    trace.get_current_span().update_name(f"embeddings {body.model}")
    # a client that hangs up cancels it: the worker hears an infer.cancel and its engine computes no more
    reply, salt = await unless_disconnected(
        request,
        embeddings.embed(gateway, c, body, request.state.request_id, request.headers.get(REQUEST_ID_HEADER)),
    )
    headers = {**id_headers(request), **({SALT_HEADER: salt} if salt else {})}
    return Response(reply, media_type="application/json", headers=headers)


def _inference_of(body: ChatCompletionRequest | CompletionRequest, request: Request, c: Caller) -> InferenceRequest:
    return body.to_inference(request.state.request_id).model_copy(
        update={"api_key_id": c.key_id, "client_request_id": request.headers.get(REQUEST_ID_HEADER)}
    )
