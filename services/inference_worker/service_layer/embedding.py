"""One embeddings request (shared/embeddings.py), from its raw body to its reply messages and its
``inference.embedded`` event.

The engine thread runs the model (``LLMEngine.submit_embedding`` queues the work, ``step()`` runs it);
here the request is parsed, tokenized off the event loop, awaited with keepalives, cut to
``dimensions`` (Matryoshka), encoded and sent. The transport is a ``send`` callable, as in serving.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

from opentelemetry import propagate, trace
from shared import errors
from shared.catalog import parse_ref
from shared.embeddings import EmbeddingReply, EmbeddingRequest, encode_vector, parts, vectors_sha256
from shared.events import EmbeddingsCompleted, EventData
from shared.inference import KEEPALIVE_S, Keepalive
from shared.prompt_commitment import commit, new_salt
from shared.rpc import ErrorBody, RpcReply
from services.inference_worker.engine import ContextLengthError, InvalidRequestError
from services.inference_worker.engine.embedding import EmbeddingCancelled, EmbeddingOutput, truncate
from services.inference_worker.service_layer.deployments import Deployment, Deployments
from services.inference_worker.service_layer.residency import Residency
from services.inference_worker.service_layer.serving import parse_request
from services.inference_worker.service_layer.telemetry import GENAI, ended, tracer

log = logging.getLogger(__name__)
Send = Callable[[bytes], Awaitable[None]]
Publish = Callable[[EventData], Awaitable[object]]


class Embedder:
    def __init__(self, deployments: Deployments, node_id: str, publish: Publish, *, max_inflight: int = 256,
                 residency: Residency | None = None) -> None:
        self.deployments, self.node_id, self.publish = deployments, node_id, publish
        self.residency = residency
        self.max_inflight = max_inflight  # beyond: 'unavailable' (overloaded, retry), as for generations
        # request id -> its deployment and engine job (None while its inputs are being tokenized)
        self.running: dict[str, tuple[Deployment, Future[EmbeddingOutput] | None]] = {}

    def cancel(self, request_id: str) -> bool:
        """An ``infer.cancel`` (its caller went away): the engine computes no more of it."""
        dep, future = self.running.get(request_id, (None, None))
        return (
            dep is not None and future is not None and dep.loop is not None and dep.loop.engine.cancel_embedding(future)
        )

    async def handle(
        self,
        raw: bytes,
        headers: dict[str, str] | None,
        subject_model: str | None,
        send: Send,
        *,
        attributed: bool = False,
    ) -> None:
        """A request from ``infer.embed.<model>`` (``attributed``: its gateway subject): never raises;
        every failure is a typed reply."""
        request_id = ""
        try:
            request = parse_request(raw, subject_model, EmbeddingRequest, attributed=attributed)
            request_id = request.request_id
            await self._embed(request, headers, send)
        except errors.StrataError as exc:
            await send(
                RpcReply(ok=False, error=ErrorBody(code=exc.code, message=exc.message)).model_dump_json().encode()
            )
        except Exception as exc:  # a bug: the caller still gets a typed answer, not a silence
            log.exception("embeddings request %s failed", request_id)
            await send(
                RpcReply(ok=False, error=ErrorBody(code="internal", message=f"internal error: {type(exc).__name__}"))
                .model_dump_json()
                .encode()
            )

    async def _embed(self, request: EmbeddingRequest, headers: dict[str, str] | None, send: Send) -> None:
        rid = request.request_id
        if len(self.running) >= self.max_inflight:
            raise errors.Unavailable(
                f"overloaded: {len(self.running)} embeddings requests in flight on this worker, retry"
            )
        if rid in self.running:
            raise errors.Conflict(f"request id {rid!r} is already running")
        dep = self.deployments.pick(parse_ref(request.model))
        if dep.loop is None:  # on-demand and unloaded: its first request loads it (service_layer/residency.py)
            if self.residency is None:
                raise errors.Unavailable(f"{dep.model.name} is not loaded on this worker, retry")
            keepalive = Keepalive(request_id=rid).model_dump_json().encode()
            await self.residency.hold_loaded(dep, rid, lambda: send(keepalive))  # the caller hears we live meanwhile
        assert dep.loop is not None
        engine = dep.loop.engine
        if not engine.can_embed:
            raise errors.Invalid(
                f"{dep.model.name} runs on the {dep.loop.runtime} runtime, which does not serve "
                "embeddings yet: deploy its safetensors checkpoint on the engine for /v1/embeddings"
            )
        hidden = engine.model_config.hidden_size
        if request.dimensions is not None and request.dimensions > hidden:
            raise errors.Invalid(
                f"dimensions {request.dimensions} is over this model's {hidden}: give at most {hidden}"
            )
        span = tracer.start_span(
            f"embeddings {dep.model.name}", context=propagate.extract(headers or {}), kind=trace.SpanKind.SERVER
        )
        with ended(span):
            span.set_attributes(
                {
                    "gen_ai.operation.name": "embeddings",
                    "gen_ai.request.model": request.model,
                    "strata.request_id": request.request_id,
                }
            )
            started = time.time()
            self.running[rid] = (dep, None)
            dep.inflight.add(rid)  # an unload drains it like a generation
            try:
                out = await self._run(dep, request, send)
            finally:
                dep.inflight.discard(rid)
                self.running.pop(rid, None)
                if self.residency is not None:
                    self.residency.touch(dep)
            vectors = out.vectors if request.dimensions is None else truncate(out.vectors, request.dimensions)
            encoded = [encode_vector(v) for v in vectors.numpy()]
            for part in parts(request.request_id, encoded):
                await send(part.model_dump_json().encode())
            salt = new_salt()
            reply = EmbeddingReply(
                request_id=request.request_id,
                model=dep.model,
                count=len(encoded),
                dimensions=vectors.shape[1],
                pooling=out.pooling,
                prompt_tokens=sum(out.prompt_tokens),
                prompt_salt=salt,
            )
            await send(RpcReply(ok=True, result=reply).model_dump_json().encode())
            span.set_attribute("gen_ai.usage.input_tokens", reply.prompt_tokens)
            trace_id = format(span.get_span_context().trace_id, "032x")
            await self._record(request, dep, reply, encoded, salt, trace_id, time.time() - started)

    async def _run(self, dep: Deployment, request: EmbeddingRequest, send: Send) -> EmbeddingOutput:
        """Queue the inputs on the engine (tokenized on a thread: 2048 texts would hold the event loop)
        and wait for the vectors, with a keepalive every KEEPALIVE_S / 2 so the caller knows we live."""
        assert dep.loop is not None
        try:
            future = await asyncio.to_thread(dep.loop.engine.submit_embedding, request.inputs)
        except ContextLengthError as exc:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {exc.max_model_len} tokens. "
                f"However, {exc}. Please reduce the length of the input."
            ) from None
        except InvalidRequestError as exc:
            raise errors.Invalid(str(exc)) from None
        self.running[request.request_id] = (dep, future)
        waiting = asyncio.wrap_future(future)
        keepalive = Keepalive(request_id=request.request_id).model_dump_json().encode()
        try:
            while True:  # at half the interval: tokenizing took some of the caller's silence allowance already
                done, _ = await asyncio.wait({waiting}, timeout=KEEPALIVE_S / 2)
                if done:
                    break
                await send(keepalive)
        except BaseException:
            dep.loop.engine.cancel_embedding(future)  # this task is cancelled (the worker stops): compute no more
            raise
        try:
            return waiting.result()
        except (EmbeddingCancelled, asyncio.CancelledError) as exc:
            raise errors.Unavailable(f"the embeddings were stopped ({str(exc) or 'cancelled'}): retry") from None
        except Exception as exc:
            raise errors.StrataError(f"the engine failed the embeddings: {type(exc).__name__}: {exc}") from None

    async def _record(
        self,
        request: EmbeddingRequest,
        dep: Deployment,
        reply: EmbeddingReply,
        encoded: list[str],
        salt: str,
        trace_id: str,
        seconds: float,
    ) -> None:
        GENAI.record_embeddings(request.model, dep.model.name, seconds, reply.prompt_tokens)
        try:
            await self.publish(
                EmbeddingsCompleted(
                    request_id=request.request_id,
                    trace_id=trace_id,
                    model=dep.model,
                    deployment_id=dep.deployment_id,
                    node_id=self.node_id,
                    device=dep.device,
                    inputs=reply.count,
                    prompt_tokens=reply.prompt_tokens,
                    dimensions=reply.dimensions,
                    pooling=reply.pooling,
                    e2e_seconds=seconds,
                    prompt_commitment=commit(request.input_bytes(), salt),
                    output_sha256=vectors_sha256(encoded),
                    api_key_id=request.api_key_id,
                    client_request_id=request.client_request_id,
                )
            )
        except Exception:  # the reply already went out; a lost event is logged, not raised into nothing
            log.exception("could not publish the embeddings event of %s", request.request_id)
