"""A scripted inference worker for gateway and CLI tests: a tiny nats-py responder that speaks the
serving contract (shared/inference.py) with fixed tokens, optional delays, an 'overloaded' mode, and
a 'die' mode that stops mid-stream without an ``end`` (as a killed worker would). Like a real worker
it publishes ``inference.completed`` for each request it finishes (cancelled ones included)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import subjects
from shared.events import InferenceCompleted, ModelId, Source, make_event
from shared.prompt_commitment import commit, new_salt
from shared.inference import (
    CANCEL_SUBJECT,
    Chunk,
    End,
    InferenceCancel,
    InferenceError,
    InferenceReply,
    InferenceRequest,
    Keepalive,
    LoadedDeployment,
    LoadedModels,
    Started,
    StreamFailure,
    TokenLogprob,
    Usage,
)
from shared.rpc import ErrorBody, RpcReply
from tests.support.helpers import flushed


@dataclass
class Script:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    delay_s: float = 0.0  # between tokens
    die_after: int | None = None  # tokens sent before falling silent for good
    overloaded: bool = False
    keepalive_s: float = 0.2


@dataclass
class FakeWorker:
    nats_url: str
    models: dict[str, Script]
    version: int = 1
    requests: list[InferenceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cancels: list[InferenceCancel] = field(default_factory=list)
    salts: dict[str, str] = field(default_factory=dict)  # request id -> the prompt salt it was given
    completed: list[InferenceCompleted] = field(default_factory=list)
    nc: Client | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def model_id(self, name: str) -> ModelId:
        return ModelId(name=name, version=self.version, digest="sha256:" + "ab" * 32)

    async def start(self) -> FakeWorker:
        self.nc = await nats.connect(self.nats_url)
        for name in self.models:
            for attributed in (False, True):  # the gateway's requests name the key that asked
                await self.nc.subscribe(subjects.inference_request(name, attributed=attributed), queue=f"model:{name}",
                                        cb=self._on_request)
        await self.nc.subscribe(CANCEL_SUBJECT, cb=self._on_cancel)
        await self.nc.subscribe(subjects.rpc("inference-worker", "models"), cb=self._on_models)
        await flushed(self.nc)
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.nc is not None:
            await self.nc.close()

    async def _on_models(self, msg: Msg) -> None:
        result = LoadedModels(
            node_id="fake",
            deployments=[
                LoadedDeployment(deployment_id=f"d-{n}", model=self.model_id(n), device="cpu", state="ready")
                for n in self.models
            ]
            + [LoadedDeployment(deployment_id="d-broken", model=self.model_id("broken"), device="cpu", state="failed")],
        )
        await msg.respond(RpcReply(ok=True, result=result.model_dump(mode="json")).model_dump_json().encode())

    async def _on_cancel(self, msg: Msg) -> None:
        self.cancels.append(InferenceCancel.model_validate_json(msg.data))

    async def _on_request(self, msg: Msg) -> None:
        request = InferenceRequest.model_validate_json(msg.data)
        self.requests.append(request)
        self.headers.append(dict(msg.headers or {}))
        task = asyncio.create_task(self._serve(msg, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_completed(self, request: InferenceRequest, name: str, finish: str, usage: Usage) -> None:
        event = InferenceCompleted(
            request_id=request.request_id,
            model=self.model_id(name),
            deployment_id=f"d-{name}",
            node_id="fake",
            device="cpu",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            queue_seconds=0,
            time_to_first_token_seconds=0,
            time_per_output_token_seconds=0,
            e2e_seconds=0,
            finish_reason=finish,
            prompt_commitment=commit(request.prompt_bytes(), self.salts.get(request.request_id, "00" * 32)),
            output_sha256="0" * 64,
            api_key_id=request.api_key_id,
            client_request_id=request.client_request_id,
        )
        self.completed.append(event)
        await self.nc.publish(
            InferenceCompleted.subject(),  # type: ignore[union-attr]
            make_event(event, Source(service="inference-worker", node="fake")).to_bytes(),
        )

    def _cancelled(self, request_id: str) -> bool:
        return any(c.request_id == request_id for c in self.cancels)

    async def _serve(self, msg: Msg, request: InferenceRequest) -> None:
        assert self.nc is not None
        name = request.model.split(":")[0].split("@")[0]
        script = self.models[name]
        rid = request.request_id
        salt = self.salts[rid] = new_salt()

        async def send(message: object) -> None:
            await self.nc.publish(msg.reply, message.model_dump_json().encode())  # type: ignore[union-attr, attr-defined]

        if script.overloaded:
            error = InferenceError(request_id=rid, code="unavailable", message="the worker's queue is full")
            if request.stream:
                await send(StreamFailure(error=error))
            else:
                await send(RpcReply(ok=False, error=ErrorBody(code="unavailable", message=error.message)))
            return
        limit = request.sampling.max_tokens or len(script.tokens)
        tokens = script.tokens[:limit]
        finish = "length" if limit < len(script.tokens) else "stop"
        usage = Usage(prompt_tokens=5, completion_tokens=len(tokens))
        lp = request.sampling.logprobs
        logprobs = [
            TokenLogprob(token=t, token_id=i, logprob=-0.5, top=[(t, -0.5)] * (lp or 0)) for i, t in enumerate(tokens)
        ]

        async def paced() -> bool:
            """Wait out one token's delay, with keepalives where asked for; False when cancelled."""
            waited = 0.0
            while waited < script.delay_s:
                if self._cancelled(rid):
                    return False
                step = min(script.keepalive_s, script.delay_s - waited)
                await asyncio.sleep(step)
                waited += step
                if request.stream or request.keepalive:
                    await send(Keepalive(request_id=rid))
            return True

        if not request.stream:
            for i in range(len(tokens)):
                if script.die_after is not None and i >= script.die_after:
                    return  # silence from now on: a dead worker sends nothing, not even keepalives
                if not await paced():
                    tokens, finish = tokens[:i], "cancelled"
                    break
            reply = InferenceReply(
                request_id=rid,
                model=self.model_id(name),
                text="".join(tokens),
                finish_reason=finish,
                usage=usage,
                logprobs=logprobs[: len(tokens)] if lp is not None else None,
                prompt_salt=salt,
            )
            await send(RpcReply(ok=True, result=reply.model_dump(mode="json")))
            await self._publish_completed(request, name, finish, Usage(prompt_tokens=5, completion_tokens=len(tokens)))
            return
        await send(Started(request_id=rid, model=self.model_id(name), prompt_salt=salt))
        for i, token in enumerate(tokens):
            if script.die_after is not None and i >= script.die_after:
                return  # silence from now on: a dead worker sends nothing, not even keepalives
            if not await paced():
                await send(
                    End(request_id=rid, finish_reason="cancelled", usage=Usage(prompt_tokens=5, completion_tokens=i))
                )
                await self._publish_completed(request, name, "cancelled", Usage(prompt_tokens=5, completion_tokens=i))
                return
            await send(
                Chunk(
                    request_id=rid,
                    index=i,
                    text=token,
                    token_ids=[i],
                    logprobs=[logprobs[i]] if lp is not None else None,
                )
            )
        await send(End(request_id=rid, finish_reason=finish, usage=usage))
        await self._publish_completed(request, name, finish, usage)
