"""Batch jobs: a durable pull consumer per model name on ``JOBS``, shared by every worker that hosts
the model. A job is acknowledged only after its result is stored in ``RESULTS`` (Nats-Msg-Id = the
request id); a worker that dies mid-job never acks, so JetStream redelivers the job to another
worker after ``ack_wait`` (a worker that is alive reports progress with ``in_progress()``)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from shared import errors, subjects
from shared.events import DeadLetter
from shared.inference import JOBS_STREAM, RESULTS_STREAM
from shared.inference_jobs import job_result
from shared.rpc import ErrorBody, RpcReply
from services.inference_worker.service_layer.serving import Server, _request_id, parse_request

log = logging.getLogger(__name__)
SERVICE = "inference-worker"


@dataclass
class JobOptions:
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    concurrency: int = 8  # jobs per model in flight on one worker: they share engine steps


@dataclass
class _Model:
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    running: set[asyncio.Task[None]] = field(default_factory=set)


def durable_name(model_name: str) -> str:
    return f"jobs-{subjects.token(model_name)}"


class JobRunner:
    def __init__(self, js: JetStreamContext, server: Server, options: JobOptions | None = None) -> None:
        self.js, self.server, self.options = js, server, options or JobOptions()
        self.models: dict[str, _Model] = {}
        self.processed = 0

    async def start(self, name: str) -> None:
        if name in self.models:
            return
        o = self.options
        psub = await self.js.pull_subscribe(
            subjects.inference_job(name), durable=durable_name(name), stream=JOBS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=o.ack_wait_s, max_deliver=o.max_deliver))
        model = _Model()
        model.task = asyncio.ensure_future(self._loop(name, psub, model))
        self.models[name] = model

    async def stop(self, name: str) -> None:
        """Fetch no more jobs for ``name``; the jobs already taken run to their end."""
        model = self.models.pop(name, None)
        if model is None:
            return
        model.stopping.set()
        await asyncio.gather(*filter(None, [model.task]), *model.running, return_exceptions=True)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self.models)))

    async def _loop(self, name: str, psub, model: _Model) -> None:
        slots = asyncio.Semaphore(self.options.concurrency)
        try:
            while not model.stopping.is_set():
                await slots.acquire()
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
                except (NatsTimeout, asyncio.TimeoutError):
                    slots.release()
                    continue
                except Exception as exc:  # a server restart: pull again after a pause
                    slots.release()
                    log.warning("jobs for %s: fetch failed (%s), retrying", name, exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    task = asyncio.ensure_future(self._process(name, msg))
                    model.running.add(task)
                    task.add_done_callback(model.running.discard)
                    task.add_done_callback(lambda _t: slots.release())
        finally:
            await psub.unsubscribe()

    async def _process(self, name: str, msg) -> None:
        try:
            request = parse_request(msg.data, name)
        except errors.StrataError as exc:
            rid = _request_id(msg.data)
            if rid:  # the client can learn why from the result
                await self._store(rid, _error(exc))
                await msg.ack()
            else:  # no id to file a result under: dead-letter it with the reason
                await self._dead_letter(msg, f"invalid job: {exc.message}")
                await msg.term()
            return
        rid = request.request_id
        if await job_result(self.js, rid) is not None:  # a duplicate of a job already done
            await msg.ack()
            return
        try:
            outcome = await self.server.complete(request, msg.headers, on_tick=msg.in_progress)
            body = RpcReply(ok=True, result=outcome.reply.model_dump(mode="json")).model_dump_json().encode()
        except errors.Unavailable as exc:  # overloaded or unloading here: another worker (or later) takes it
            if (msg.metadata.num_delivered or 1) < self.options.max_deliver:
                await msg.nak(delay=1.0)
                return
            body = _error(exc)  # the last delivery: the client learns why instead of waiting forever
        except errors.StrataError as exc:
            body = _error(exc)
        except Exception as exc:  # a bug: retried (bounded by max_deliver), never acked as done
            log.exception("job %s failed", rid)
            await msg.nak(delay=1.0)
            return
        await self._store(rid, body)
        await msg.ack()
        self.processed += 1

    async def _store(self, request_id: str, body: bytes) -> None:
        await self.js.publish(subjects.inference_result(request_id), body, stream=RESULTS_STREAM,
                              headers={"Nats-Msg-Id": request_id})

    async def _dead_letter(self, msg, reason: str) -> None:
        meta = msg.metadata
        record = DeadLetter(service=SERVICE, consumer=meta.consumer or "", subject=msg.subject, reason=reason,
                            deliveries=meta.num_delivered or 1, event_id=None,
                            payload=msg.data.decode("utf-8", errors="replace"),
                            headers={k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)})
        await self.js.publish(subjects.dead_letter(SERVICE), record.model_dump_json().encode(),
                              stream=subjects.DEADLETTER_STREAM)


def _error(exc: errors.StrataError) -> bytes:
    return RpcReply(ok=False, error=ErrorBody(code=exc.code, message=exc.message)).model_dump_json().encode()
