"""One inference request, from its raw body to its reply messages and its inference event.

The transport is a ``send`` callable (bytes to the reply inbox); the entrypoint owns NATS. A
non-stream request gets one ``RpcReply`` (result: ``InferenceReply``; keepalives before it if it asked
for them), a streamed one gets
``started``, ``chunk``s, keepalives while nothing happens for ``KEEPALIVE_S``, and one ``end`` or
``error`` (shared/inference.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import propagate, trace
from pydantic import BaseModel

from shared import errors, rpc
from shared.catalog import parse_ref
from shared.events import EventData, InferenceCompleted, InferenceFailed
from shared.inference import (
    KEEPALIVE_S, Choice, ChoiceEnd, Chunk, End, InferenceError, InferenceReply, InferenceRequest, Keepalive, Started,
    StreamFailure, TokenLogprob, Usage,
)
from shared.prompt_commitment import commit, new_salt
from shared.rpc import ErrorBody, RpcReply
from services.inference_worker.adapters.inflight_journal import InflightJournal
from services.inference_worker.engine import StreamEvent
from services.inference_worker.service_layer.choices import Finals, engine_ids, to_params
from services.inference_worker.service_layer.deployments import Deployment, Deployments
from services.inference_worker.service_layer.residency import Residency
from services.inference_worker.service_layer.telemetry import GENAI, ended, engine_spans, tracer
from services.inference_worker.service_layer.admission import Run, prepare, submit
from services.inference_worker.service_layer.tool_use import ChoiceStream

log = logging.getLogger(__name__)
Send = Callable[[bytes], Awaitable[None]]
R = TypeVar("R", bound=BaseModel)
Publish = Callable[[EventData], Awaitable[object]]


@dataclass
class Outcome:
    """A finished request, as the reply and the inference event see it."""

    reply: InferenceReply
    error: str | None = None


class Server:
    def __init__(self, deployments: Deployments, node_id: str, publish: Publish, *, max_inflight: int = 256,
                 journal: InflightJournal | None = None, residency: Residency | None = None) -> None:
        self.deployments, self.node_id, self.publish = deployments, node_id, publish
        self.residency = residency
        self.max_inflight = max_inflight
        self.inflight: dict[str, Deployment] = {}  # request id -> the deployment running it
        self.choices: dict[str, list[str]] = {}  # request id -> its choices' engine ids
        self.cancelled_early: set[str] = set()  # cancelled while being prepared, before the engine had it
        self.waiting_for_load: set[str] = set()  # waiting for an on-demand model to load
        self.journal = journal

    async def report_cut_short(self) -> int:
        """inference.failed for each request a killed predecessor on this node left unfinished."""
        if self.journal is None:
            return 0
        cut = self.journal.cut_short()
        for request_id, model_ref in cut:
            await self.publish(
                InferenceFailed(
                    request_id=request_id,
                    model_ref=model_ref,
                    node_id=self.node_id,
                    reason=f"the worker on {self.node_id} stopped (killed or crashed) before finishing it",
                )
            )
        return len(cut)

    # ---- entrypoints ------------------------------------------------------------------------
    async def handle(
        self,
        raw: bytes,
        headers: dict[str, str] | None,
        subject_model: str | None,
        send: Send,
        *,
        attributed: bool = False,
    ) -> None:
        """A request from ``infer.request.<model>`` (``attributed``: its gateway subject): never raises;
        every failure is a typed reply."""
        try:
            request = parse_request(raw, subject_model, attributed=attributed)
        except errors.StrataError as exc:  # only a bad body is parsed twice, to answer in its own shape
            await self._send_error(send, _wants_stream(raw), _request_id(raw), exc)
            return
        if self.residency is not None:  # an unloaded on-demand model loads first, with keepalives while it does
            tick = lambda: send(_msg(Keepalive(request_id=request.request_id)))  # noqa: E731
            self.waiting_for_load.add(request.request_id)
            try:
                await self.residency.load_for(
                    request.model, request.request_id, tick if request.stream or request.keepalive else None
                )
            except errors.StrataError as exc:
                self.cancelled_early.discard(request.request_id)
                await self._send_error(send, request.stream, request.request_id, exc)
                return
            finally:
                self.waiting_for_load.discard(request.request_id)
        if not request.stream:

            async def keepalive() -> None:
                await send(_msg(Keepalive(request_id=request.request_id)))

            try:
                outcome = await self.complete(request, headers, on_tick=keepalive if request.keepalive else None)
            except errors.StrataError as exc:
                await self._send_error(send, False, request.request_id, exc)
                return
            await send(_ok(outcome.reply))
            return
        await self._stream(request, headers, send)

    def cancel(self, request_id: str) -> bool:
        if request_id in self.waiting_for_load:  # cancelled as soon as the engine has it
            self.cancelled_early.add(request_id)
            return True
        dep = self.inflight.get(request_id)
        if not (dep and dep.loop):
            return False
        if request_id not in self.choices:  # its grammar is still compiling: cancelled once it is submitted
            self.cancelled_early.add(request_id)
            return True
        return any([dep.loop.cancel(eid) for eid in self.choices[request_id]])

    async def complete(
        self,
        request: InferenceRequest,
        headers: dict[str, str] | None = None,
        on_tick: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Run a request to its end (non-stream replies and batch jobs); raises a typed error when
        it cannot start or the engine failed it. ``on_tick`` runs at least every KEEPALIVE_S."""
        n = request.sampling.n
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        finals = Finals(n)
        loop = asyncio.get_running_loop()
        last_tick, admitted = loop.time(), False
        salt = new_salt()
        async with aclosing(self._generate(request, headers, salt)) as stream:
            async for run, choice, event in stream:
                idle = event is None and admitted  # the first None is the admission itself
                admitted = True
                if on_tick is not None and (idle or loop.time() - last_tick >= KEEPALIVE_S):
                    await on_tick()  # busy or idle, but not at admission: most requests end before a tick is due
                    last_tick = loop.time()
                if event is None:
                    continue
                texts[choice].append(event.text)
                lps[choice].extend(event.logprobs)
                if event.finished:
                    if event.finish_reason == "error":
                        raise errors.Invalid(event.error or "the engine failed the request")
                    finals.add(choice, event)
                    if finals.done:
                        return Outcome(self._reply(request, run, finals, ["".join(t) for t in texts], lps, salt))
        raise errors.StrataError("the request ended without a final event")  # pragma: no cover

    # ---- streaming --------------------------------------------------------------------------
    async def _stream(self, request: InferenceRequest, headers: dict[str, str] | None, send: Send) -> None:
        rid, index, started = request.request_id, 0, False
        calls: list[ChoiceStream] | None = None  # with tools: each choice's parser
        finals = Finals(request.sampling.n)
        salt = new_salt()
        try:
            async with aclosing(self._generate(request, headers, salt)) as stream:
                async for run, choice, event in stream:
                    if not started:  # at admission, before the engine scheduled it
                        await send(_msg(Started(request_id=rid, model=run.dep.model, prompt_salt=salt)))
                        calls = [run.tools.stream() for _ in range(request.sampling.n)] if run.tools else None
                        started = True
                        if event is None:
                            continue
                    if event is None:
                        await send(_msg(Keepalive(request_id=rid)))
                        continue
                    text, deltas = calls[choice].feed(event.text, event.finished) if calls else (event.text, None)
                    if event.token_ids or text or deltas:
                        await send(
                            _msg(
                                Chunk(
                                    request_id=rid,
                                    index=index,
                                    text=text,
                                    token_ids=event.token_ids,
                                    logprobs=self._logprobs(run.dep, event.logprobs, request),
                                    choice=choice,
                                    tool_calls=deltas,
                                )
                            )
                        )
                        index += 1
                    if event.finished:
                        if event.finish_reason == "error":
                            raise errors.Invalid(event.error or "the engine failed the request")
                        finals.add(choice, _with_calls(event, calls[choice]) if calls else event)
                        if finals.done:
                            await send(_msg(self._end(rid, finals)))
        except errors.StrataError as exc:
            await self._send_error(send, True, rid, exc)

    # ---- the core ---------------------------------------------------------------------------
    async def _generate(
        self, request: InferenceRequest, headers: dict[str, str] | None, salt: str
    ) -> AsyncIterator[tuple[Run, int, StreamEvent | None]]:
        """Admit the request (its n choices) into an engine and yield (its run, choice, stream event)
        (event None: nothing happened for KEEPALIVE_S). Publishes the inference event when the request ends,
        however it ends, with its
        prompt committed under ``salt`` (which the caller returns to the requester, never to the event)."""
        rid = request.request_id
        if len(self.inflight) >= self.max_inflight:
            raise errors.Unavailable(f"overloaded: {len(self.inflight)} requests in flight on this worker, retry")
        if rid in self.inflight:
            raise errors.Conflict(f"request id {rid!r} is already running")
        dep = self.deployments.pick(parse_ref(request.model))
        if dep.loop is None:  # on-demand and unloaded (a batch job, or evicted since handle() loaded it)
            if self.residency is None:
                raise errors.Unavailable(f"{dep.model.name} is not loaded on this worker, retry")
            await self.residency.hold_loaded(dep, rid)
        assert dep.loop is not None
        if not dep.loop.engine.can_generate:
            raise errors.Invalid(
                f"{dep.model.name} is an embedding model (its checkpoint has no LM head): "
                "it answers /v1/embeddings only"
            )
        # the caller's trace continues here (W3C traceparent in the NATS headers); the span is not made
        # current: this generator's frames run in whichever task reads it
        span = tracer.start_span(
            f"inference {dep.model.name}", context=propagate.extract(headers or {}), kind=trace.SpanKind.SERVER
        )
        with ended(span):
            span.set_attribute("gen_ai.request.model", request.model)
            span.set_attribute("gen_ai.operation.name", "chat" if request.messages else "text_completion")
            span.set_attribute("strata.request_id", rid)
            trace_id = format(span.get_span_context().trace_id, "032x")
            started = time.time()
            ids = engine_ids(rid, request.sampling.n)
            events: asyncio.Queue[StreamEvent] = asyncio.Queue()
            self.inflight[rid] = dep  # counted, and cancellable, while its grammar compiles
            dep.inflight.add(rid)  # and never evicted (on-demand) from here on
            try:
                # a grammar compiles (100 ms and more for a large schema) off the event loop
                guided = bool(request.tools) or request.sampling.response_format is not None
                run, params, messages = (
                    await asyncio.to_thread(prepare, request, dep, len(ids))
                    if guided
                    else prepare(request, dep, len(ids))
                )
                submit(request, run, ids, params, messages, events)
            except BaseException:
                self.inflight.pop(rid, None)
                self.cancelled_early.discard(rid)
                self._release(dep, rid)
                raise
            if rid in self.cancelled_early:
                for eid in ids:  # each ends at the engine's next step with finish_reason "cancelled"
                    dep.loop.cancel(eid)
            choice_of = {eid: i for i, eid in enumerate(ids)}
            finals = Finals(len(ids))
            self.choices[rid] = ids
            dep.inflight.add(rid)
            if self.journal is not None:
                self.journal.started(rid, request.model)
            texts: list[list[str]] = [[] for _ in ids]
            final = None
            try:
                yield run, 0, None  # admitted: a stream says "started" now, whatever the queue holds
                while True:
                    try:  # asyncio.timeout, not wait_for: no task per event
                        async with asyncio.timeout(KEEPALIVE_S):
                            event = await events.get()
                    except TimeoutError:
                        yield run, 0, None
                        continue
                    choice = choice_of[event.request_id]
                    texts[choice].append(event.text)
                    if event.finished:
                        finals.add(choice, event)
                        if finals.done or event.finish_reason == "error":
                            final = finals.merged()
                    yield run, choice, event
                    if final is not None:
                        return
            finally:
                if not finals.done:  # the caller went away, a choice failed, or the worker is stopping: free the blocks
                    for eid in ids:
                        dep.loop.cancel(eid)
                self.inflight.pop(rid, None)
                self.choices.pop(rid, None)
                self.cancelled_early.discard(rid)
                self._release(dep, rid)
                if self.journal is not None:
                    self.journal.ended(rid)
                with trace.use_span(span, end_on_exit=False):  # the inference event continues this trace
                    asyncio.ensure_future(
                        self._record(request, dep, final, "".join("".join(t) for t in texts), trace_id, started, salt)
                    )
                if final is not None:
                    span.set_attributes(
                        {
                            "gen_ai.response.model": dep.model.name,
                            "gen_ai.usage.input_tokens": final.metrics.num_prompt_tokens,
                            "gen_ai.usage.output_tokens": final.metrics.num_generated_tokens,
                        }
                    )
                    engine_spans(span, final.metrics)

    async def _record(
        self,
        request: InferenceRequest,
        dep: Deployment,
        final: StreamEvent | None,
        output: str,
        trace_id: str,
        started: float,
        salt: str,
    ) -> None:
        # Scheduled before a non-stream reply is sent: one loop turn first, so that nats-py's flusher
        # writes the reply before this bookkeeping (metrics, the event) runs; it was ~0.1 ms of every reply.
        await asyncio.sleep(0)
        operation = "chat" if request.messages else "text_completion"
        try:
            if final is None or final.finish_reason == "error":
                reason = final.error if final is not None and final.error else "the request was abandoned"
                GENAI.record(
                    operation,
                    request.model,
                    dep.model.name,
                    time.time() - started,
                    0,
                    0,
                    0,
                    0,
                    error="abandoned" if final is None else "engine_error",
                )
                await self.publish(
                    InferenceFailed(
                        request_id=request.request_id,
                        trace_id=trace_id,
                        model_ref=request.model,
                        node_id=self.node_id,
                        reason=reason,
                        e2e_seconds=time.time() - started,
                    )
                )
                return
            m = final.metrics
            GENAI.record(
                operation,
                request.model,
                dep.model.name,
                m.e2e or 0.0,
                m.ttft or 0.0,
                m.tpot or 0.0,
                m.num_prompt_tokens,
                m.num_generated_tokens,
            )
            await self.publish(
                InferenceCompleted(
                    request_id=request.request_id,
                    trace_id=trace_id,
                    model=dep.model,
                    deployment_id=dep.deployment_id,
                    node_id=self.node_id,
                    device=dep.device,
                    prompt_tokens=m.num_prompt_tokens,
                    completion_tokens=m.num_generated_tokens,
                    queue_seconds=m.queue_time or 0.0,
                    time_to_first_token_seconds=m.ttft or 0.0,
                    time_per_output_token_seconds=m.tpot or 0.0,
                    e2e_seconds=m.e2e or 0.0,
                    finish_reason=final.finish_reason or "stop",
                    prompt_commitment=commit(request.prompt_bytes(), salt),
                    output_sha256=sha256(output),
                    api_key_id=request.api_key_id,
                    client_request_id=request.client_request_id,
                    runtime=dep.loop.runtime if dep.loop else None,
                )
            )
        except Exception:  # the reply already went out; a lost event is logged, not raised into nothing
            log.exception("could not publish the inference event of %s", request.request_id)

    # ---- helpers ----------------------------------------------------------------------------
    def _release(self, dep: Deployment, rid: str) -> None:
        dep.inflight.discard(rid)
        if self.residency is not None:
            self.residency.touch(dep)  # an on-demand model's keep-alive counts from the last request's end

    def _reply(
        self, request: InferenceRequest, run: Run, finals: Finals, texts: list[str], lps: list[list], salt: str
    ) -> InferenceReply:
        m = finals.merged().metrics
        choices = []
        for i, e in enumerate(finals.events):
            text, calls, reason = texts[i], None, e.finish_reason or "stop"
            if run.tools is not None:
                text, calls, reason = run.tools.parse(text, reason)
            choices.append(
                Choice(
                    index=i,
                    text=text,
                    finish_reason=reason,
                    tool_calls=calls,
                    logprobs=self._logprobs(run.dep, lps[i], request),
                )
            )
        return InferenceReply(
            request_id=request.request_id,
            model=run.dep.model,
            text=choices[0].text,
            tool_calls=choices[0].tool_calls,
            finish_reason=choices[0].finish_reason,
            usage=Usage(prompt_tokens=m.num_prompt_tokens, completion_tokens=m.num_generated_tokens),
            logprobs=choices[0].logprobs,
            prompt_salt=salt,
            choices=choices if len(choices) > 1 else None,
        )

    @staticmethod
    def _end(request_id: str, finals: Finals) -> End:
        m = finals.merged().metrics
        reasons = [e.finish_reason or "stop" for e in finals.events if e is not None]
        return End(
            request_id=request_id,
            finish_reason=reasons[0],
            usage=Usage(prompt_tokens=m.num_prompt_tokens, completion_tokens=m.num_generated_tokens),
            choices=[ChoiceEnd(index=i, finish_reason=r) for i, r in enumerate(reasons)] if len(reasons) > 1 else None,
        )

    @staticmethod
    def _logprobs(dep: Deployment, lps: list, request: InferenceRequest) -> list[TokenLogprob] | None:
        if request.sampling.logprobs is None or dep.loop is None:
            return None
        tok = dep.loop.engine.tokenizer

        def piece(token_id: int) -> str:
            return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)

        return [
            TokenLogprob(
                token=piece(lp.token_id),
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[(piece(t), v) for t, v in lp.top],
            )
            for lp in lps
        ]

    async def _send_error(self, send: Send, streaming: bool, request_id: str, exc: errors.StrataError) -> None:
        if streaming:
            await send(
                _msg(StreamFailure(error=InferenceError(request_id=request_id, code=exc.code, message=exc.message)))
            )
        else:
            await send(
                RpcReply(ok=False, error=ErrorBody(code=exc.code, message=exc.message)).model_dump_json().encode()
            )


def parse_request(
    raw: bytes,
    subject_model: str | None,
    request_type: type[R] = InferenceRequest,
    *,  # type: ignore[assignment]
    attributed: bool = False,
) -> R:
    """A request (an InferenceRequest, or an EmbeddingRequest: service_layer/embedding.py) sent on its
    model's subject; only one sent on the attributed subject (the gateway's) may name an API key."""
    request = rpc.parse(raw, request_type)
    ref = parse_ref(request.model)  # type: ignore[attr-defined]
    if subject_model is not None and ref.name != subject_model:
        raise errors.Invalid(f"the request names model {ref.name!r} but was sent to the subject of {subject_model!r}")
    claimed = request.claimed_attribution()  # type: ignore[attr-defined]
    if claimed and not attributed:
        raise errors.Forbidden(f"{claimed} is set by the api-gateway only: send the request without it")
    return request


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ok(reply: InferenceReply) -> bytes:
    return RpcReply(ok=True, result=reply).model_dump_json().encode()  # serialised once, straight to JSON


def _with_calls(event: StreamEvent, calls: ChoiceStream) -> StreamEvent:
    """A streamed choice's final event, its finish_reason ``tool_calls`` when it made a call."""
    return dataclasses.replace(event, finish_reason=calls.finish_reason(event.finish_reason or "stop"))


def _msg(message: Started | Chunk | End | StreamFailure | Keepalive) -> bytes:
    return message.model_dump_json().encode()


def _wants_stream(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("stream") is True


def _request_id(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ""
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else ""


__all__ = ["Outcome", "Server", "parse_request", "sha256", "to_params"]
