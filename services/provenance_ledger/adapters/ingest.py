"""The ledger's own durable pull consumer on EVENTS: fetch a batch, append it in one SQLite commit,
then acknowledge it. The foundation's EventConsumer acknowledges one message per handler call;
the ledger needs one commit per *batch* to reach tens of thousands of events a second, so it pulls
with nats-py directly (same stream, same dead-letter record, same typed parsing).

- An event is acknowledged only after the commit that holds its leaf: a crash between the two
  means a redelivery, which the ledger recognises by event id and appends once.
- Bytes that are not a valid event are dead-lettered with the reason (DEADLETTER stream) and
  terminated; the ledger records only valid events.
- A failed commit (disk full, locked file) is never dead-lettered: the batch is negatively
  acknowledged and retried with back-off, so no valid event is ever dropped; ``max_deliver`` is
  unbounded for this consumer for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.provenance_ledger.service_layer.ledger import Incoming, Ledger
from shared import subjects
from shared.events import DeadLetter, MalformedEvent, parse_event

log = logging.getLogger(__name__)
DURABLE = "provenance-ledger-log"

# A batch of 1000 is appended in about 0.1 s; a crashed ledger's unacknowledged batch comes back to
# its successor after this long, so it is short enough to catch up soon and long enough never to expire
# under a slow commit (a redelivered event is appended once anyway).
ACK_WAIT_S = 10.0


class EventIngest:
    def __init__(
        self,
        nc: Client,
        ledger: Ledger,
        *,
        service: str = "provenance-ledger",
        durable: str = DURABLE,
        batch: int = 1000,
        ack_wait_s: float = ACK_WAIT_S,
        after_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.nc, self.ledger, self.service, self.durable, self.batch = nc, ledger, service, durable, batch
        self.after_commit = after_commit
        self.ack_wait_s = ack_wait_s
        self.dead_lettered = 0
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        js = self.nc.jetstream()
        if self.ledger.size == 0:
            # An empty ledger (first start, or its file was removed to rebuild it) replays the
            # whole stream: a durable left from an earlier life would start after what it acked.
            try:
                await js.delete_consumer(subjects.EVENTS_STREAM, self.durable)
                log.warning("ledger is empty: replaying the EVENTS stream from the start")
            except NotFoundError:
                pass
        config = ConsumerConfig(
            durable_name=self.durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.EVENTS_ALL, ack_wait=self.ack_wait_s, max_deliver=-1, max_ack_pending=20_000,
        )
        await js.add_consumer(subjects.EVENTS_STREAM, config)
        self._sub = await js.pull_subscribe_bind(self.durable, subjects.EVENTS_STREAM)
        self._js = js
        self._task = asyncio.create_task(self._run(), name="ledger-ingest")

    async def stop(self) -> None:
        """Stop pulling; a batch being appended finishes (its commit and acks) first."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5.0)
            if not done:
                log.error("the ingest task did not stop within 5s of being cancelled")
        sub = getattr(self, "_sub", None)
        if sub is not None:
            try:
                await asyncio.wait_for(sub.unsubscribe(), timeout=2.0)
            except Exception as exc:  # closing anyway: the durable keeps our place on the server
                log.warning("could not unsubscribe the ledger's pull subscription: %s", exc)
        log.info("ledger ingest stopped")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                try:
                    msgs = await self._sub.fetch(self.batch, timeout=1.0)
                except (NatsTimeout, asyncio.TimeoutError):  # nats-py raises either when nothing came
                    msgs = []
                if msgs:
                    await self.process(msgs)
                if self.after_commit is not None:
                    await self.after_commit()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep ingesting: log, back off, and let NATS redeliver
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("ledger ingest failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def process(self, msgs: list[Msg]) -> None:
        valid: list[Incoming] = []
        valid_msgs: list[Msg] = []
        for msg in msgs:
            try:
                event = parse_event(msg.data, msg.subject)
            except MalformedEvent as exc:
                await self._dead_letter(msg, str(exc))
                await msg.term()
                continue
            valid.append(Incoming(msg.data, event, msg.metadata.sequence.stream))
            valid_msgs.append(msg)
        try:
            self.ledger.append_batch(valid)
        except Exception:
            for msg in valid_msgs:
                await msg.nak(delay=1.0)
            raise
        for msg in valid_msgs:  # only now: the leaves are committed
            await msg.ack()

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        record = DeadLetter(
            service=self.service, consumer=self.durable, subject=msg.subject, reason=reason,
            deliveries=msg.metadata.num_delivered, payload=msg.data.decode("utf-8", errors="replace"),
            headers={k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)},
        )
        await self._js.publish(subjects.dead_letter(self.service), record.model_dump_json().encode(), stream=subjects.DEADLETTER_STREAM)
        self.dead_lettered += 1
        log.warning("dead-lettered a malformed event on %s: %s", msg.subject, reason)

    def health(self) -> dict[str, Any]:
        return {"running": self.running, "dead_lettered": self.dead_lettered, "failures": self.failures, "last_error": self.last_error}
