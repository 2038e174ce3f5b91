"""The ledger's own durable pull consumer on EVENTS: fetch a batch, append it in one SQLite commit,
then acknowledge it. The foundation's EventConsumer acknowledges one message per handler call; the
ledger needs one commit per *batch* to reach tens of thousands of events a second. It pulls with the
same loop (shared/pull.py: PullLoop), dead-letters with the same writer and parses the same way.

- An event is acknowledged only after the commit that holds its leaf: a crash between the two
  means a redelivery, which the ledger recognises by event id and appends once.
- Bytes that are not a valid event are dead-lettered with the reason (DEADLETTER stream) and
  terminated; the ledger records only valid events.
- A failed commit (disk full, locked file) is never dead-lettered: the batch is negatively
  acknowledged and retried with back-off, so no valid event is ever dropped; ``max_deliver`` is
  unbounded for this consumer for the same reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import propagate, trace

from services.provenance_ledger.service_layer.ledger import Incoming, Ledger
from shared import subjects
from shared.events import MalformedEvent, parse_event
from shared.pull import PullLoop, dead_letter
from shared.telemetry import RecordWhenExported

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
        self._loop: PullLoop | None = None

    async def start(self) -> None:
        """Pull EVENTS through the ledger's own durable, each batch appended by ``process`` in one commit
        (the module's docstring says why this is not Service's one-event-at-a-time consumer)."""
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
        self._js = js
        sub = await js.pull_subscribe_bind(self.durable, subjects.EVENTS_STREAM)
        self._loop = PullLoop(sub, self._round, name="ledger-ingest", batch=self.batch, wait_s=1.0)
        self._loop.start()

    async def stop(self) -> None:
        """Stop pulling; the durable keeps our place on the server."""
        if self._loop is not None:
            await self._loop.stop()
        log.info("ledger ingest stopped")

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    async def _round(self, msgs: list[Msg]) -> None:
        if msgs:
            await self.process(msgs)
        if self.after_commit is not None:
            await self.after_commit()

    async def process(self, msgs: list[Msg]) -> None:
        valid: list[Incoming] = []
        valid_msgs: list[Msg] = []
        for msg in msgs:
            try:
                event = parse_event(msg.data, msg.subject)
            except MalformedEvent as exc:
                await dead_letter(self._js, msg, service=self.service, consumer=self.durable, reason=str(exc))
                self.dead_lettered += 1
                await msg.term()
                continue
            valid.append(Incoming(msg.data, event, msg.metadata.sequence.stream))
            valid_msgs.append(msg)
        try:
            started = time.time_ns()
            self.ledger.append_batch(valid)
            if RecordWhenExported.exporting:
                _append_spans(valid, valid_msgs, started, time.time_ns())
        except Exception:
            for msg in valid_msgs:
                await msg.nak(delay=1.0)
            raise
        for msg in valid_msgs:  # only now: the leaves are committed
            await msg.ack()

    @property
    def failures(self) -> int:
        return self._loop.failures if self._loop is not None else 0

    @property
    def last_error(self) -> str | None:
        return self._loop.last_error if self._loop is not None else None

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "dead_lettered": self.dead_lettered,
            "failures": self.failures,
            "last_error": self.last_error,
        }


_tracer = trace.get_tracer("strata.provenance-ledger")


def _append_spans(batch: list[Incoming], msgs: list[Msg], start_ns: int, end_ns: int) -> None:
    """Each event's append joins the trace its publisher sent (W3C traceparent in the NATS headers), so
    one inference's trace holds its ledger record; the batch's one commit is each span's time."""
    for incoming, msg in zip(batch, msgs):
        context = propagate.extract(msg.headers or {})
        if trace.get_current_span(context).get_span_context().is_valid:
            span = _tracer.start_span(
                f"ledger append {incoming.event.type}",
                context=context,
                start_time=start_ns,
                kind=trace.SpanKind.CONSUMER,
                attributes={"strata.event_id": incoming.event.id, "strata.batch_size": len(batch)},
            )
            span.end(end_time=end_ns)
