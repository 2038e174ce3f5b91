"""Batch jobs: a durable pull consumer per model name on ``JOBS``, shared by every worker that hosts
the model. A job is acknowledged only after its result is stored in ``RESULTS`` (Nats-Msg-Id = the
request id); a worker that dies mid-job never acks, so JetStream redelivers the job to another
worker after ``ack_wait`` (a worker that is alive reports progress with ``in_progress()``)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from shared import errors, subjects
from shared.inference import JOBS_STREAM, RESULTS_STREAM
from shared.inference_jobs import job_result
from shared.pull import PullLoop, dead_letter
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
    loop: PullLoop
    running: set[asyncio.Task[None]] = field(default_factory=set)


def durable_name(model_name: str) -> str:
    return f"jobs-{subjects.token(model_name)}"


class JobRunner:
    def __init__(self, js: JetStreamContext, server: Server, options: JobOptions | None = None) -> None:
        self.js, self.server, self.options = js, server, options or JobOptions()
        self.models: dict[str, _Model] = {}
        self.processed = 0

    async def start(self, name: str) -> None:
        """Take ``name``'s batch jobs: its durable (one per model, shared by its workers) pulled while the model
        is deployed here, each job run by ``process``. Registered here, not by Service: the durable is made
        per model at run time, on the JOBS work queue."""
        if name in self.models:
            return
        o = self.options
        psub = await self.js.pull_subscribe(
            subjects.inference_job(name), durable=durable_name(name), stream=JOBS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=o.ack_wait_s, max_deliver=o.max_deliver))
        slots = asyncio.Semaphore(o.concurrency)  # jobs of one model in flight here: they share engine steps

        async def take(msgs: list) -> None:
            for msg in msgs:
                task = asyncio.ensure_future(self.process(name, msg))
                model.running.add(task)
                task.add_done_callback(model.running.discard)
                task.add_done_callback(lambda _t: slots.release())

        model = _Model(PullLoop(psub, take, name=f"jobs:{name}", slots=slots))
        model.loop.start()
        self.models[name] = model

    async def stop(self, name: str) -> None:
        """Fetch no more jobs for ``name``; the jobs already taken run to their end."""
        model = self.models.pop(name, None)
        if model is None:
            return
        await model.loop.stop()
        await asyncio.gather(*model.running, return_exceptions=True)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self.models)))

    async def process(self, name: str, msg) -> None:
        try:
            request = parse_request(msg.data, name)
        except errors.StrataError as exc:
            rid = _request_id(msg.data)
            if rid:  # the client can learn why from the result
                await self._store(rid, _error(exc))
                await msg.ack()
            else:  # no id to file a result under: dead-letter it with the reason
                await dead_letter(
                    self.js,
                    msg,
                    service=SERVICE,
                    consumer=msg.metadata.consumer or "",
                    reason=f"invalid job: {exc.message}",
                )
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
        except Exception:  # a bug: retried (bounded by max_deliver), never acked as done
            log.exception("job %s failed", rid)
            await msg.nak(delay=1.0)
            return
        await self._store(rid, body)
        await msg.ack()
        self.processed += 1

    async def _store(self, request_id: str, body: bytes) -> None:
        await self.js.publish(
            subjects.inference_result(request_id), body, stream=RESULTS_STREAM, headers={"Nats-Msg-Id": request_id}
        )


def _error(exc: errors.StrataError) -> bytes:
    return RpcReply(ok=False, error=ErrorBody(code=exc.code, message=exc.message)).model_dump_json().encode()
