"""The one way Strata pulls from JetStream, and the one way it dead-letters what it cannot take.

Every consumer (a service's events, the ledger's ingest, the worker's batch jobs, the monitor's replay)
fetches with ``fetch``; the long-running ones run a ``PullLoop``, which decides nothing about acks:
its handler settles each message (one by one, or the whole batch after one commit). Whatever cannot
be taken (bytes that are no event, a job with no id, a handler that kept failing) goes to
``dead_letter``, once, with the reason, before the original is terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from shared import subjects
from shared.events import DeadLetter

log = logging.getLogger(__name__)
PAYLOAD_MAX = 64 * 1024  # a dead letter carries at most this much of the original (NATS caps a message at 1 MiB)
REST_WAIT_S = 0.05

Handle = Callable[[list[Any]], Awaitable[None]]


async def fetch(sub: Any, most: int, wait_s: float) -> list[Any]:
    """Up to ``most`` messages: the first as soon as there is one (none after ``wait_s``), then whatever
    is already waiting. A single fetch of N that got fewer would wait out its whole time-out for the rest."""
    try:
        batch = await sub.fetch(1, timeout=wait_s)
    except TimeoutError:  # nothing new (nats' own TimeoutError or asyncio's)
        return []
    if most > 1:
        with contextlib.suppress(TimeoutError):
            batch += await sub.fetch(most - 1, timeout=REST_WAIT_S)
    return batch


def headers_of(msg: Any) -> dict[str, str]:
    return {k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)}


async def dead_letter(js: JetStreamContext, msg: Any, *, service: str, consumer: str, reason: str,
                      event_id: str | None = None) -> DeadLetter:
    """Copy ``msg`` to ``dlq.<service>`` with the reason, confirmed by JetStream (the caller terminates
    the original only after this returns: nothing is lost)."""
    from shared.bus import retry_transient  # the bus imports this module

    record = DeadLetter(
        service=service, consumer=consumer, subject=msg.subject, reason=reason,
        deliveries=msg.metadata.num_delivered or 1, event_id=event_id,
        payload=msg.data[:PAYLOAD_MAX].decode("utf-8", errors="replace"),
        payload_bytes=len(msg.data), truncated=len(msg.data) > PAYLOAD_MAX, headers=headers_of(msg),
    )
    body = record.model_dump_json().encode()
    await retry_transient(f"dead-letter {msg.subject}", lambda: js.publish(
        subjects.dead_letter(service), body, stream=subjects.DEADLETTER_STREAM))
    log.warning("%s/%s: dead-lettered %s: %s", service, consumer, msg.subject, reason)
    return record


class PullLoop:
    """Fetch from a pull subscription and hand each batch to ``handle``, until stopped; a fetch that
    found nothing in ``wait_s`` hands over an empty batch, so that a handler can do periodic work. A fetch that
    fails (NATS reconnecting) is tried again after a pause; a handler that raises is logged and the loop
    goes on (what it left unacknowledged comes back after ack_wait). ``slots``: fetch one message at a
    time, only while a slot is free; the handler's work releases it (the jobs, which run concurrently)."""

    def __init__(self, sub: Any, handle: Handle, *, name: str, batch: int = 1, wait_s: float = 1.0,
                 slots: asyncio.Semaphore | None = None) -> None:
        if slots is not None and batch != 1:
            raise ValueError("a PullLoop with slots fetches one message at a time")
        self.sub, self.handle, self.name, self.batch, self.wait_s, self.slots = sub, handle, name, batch, wait_s, slots
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Fetch no more; a batch being handled is cancelled at its next await (what it did not
        acknowledge comes back). The flag too: Python 3.11's wait_for, inside nats-py's fetch, can
        swallow a cancellation that lands as a message arrives, and the loop would then run on."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(Exception):  # else the connection's drain waits out its timeout for it
            await asyncio.wait_for(self.sub.unsubscribe(), 2.0)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            if self.slots is not None:
                await self.slots.acquire()
            try:
                msgs = await fetch(self.sub, self.batch, self.wait_s)
            except nats.errors.Error as exc:  # reconnecting: a durable consumer keeps our place
                log.info("%s: fetch failed (%s); again shortly", self.name, type(exc).__name__)
                msgs = []
                await asyncio.sleep(0.5)
            if self.slots is not None and not msgs:
                self.slots.release()  # the slot taken for an empty fetch
            if self._stopping:  # a swallowed cancellation (see stop): leave the batch for redelivery
                return
            try:
                await self.handle(msgs)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep pulling: NATS redelivers what was not acknowledged
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: handling a batch of %d failed; again in %.1fs", self.name, len(msgs), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
