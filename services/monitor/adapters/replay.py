"""Reading back what a durable consumer already acknowledged, so a restarted process can rebuild its
in-memory state before the durable delivers anything new.

The durable's ack floor is the line: every stream sequence up to it was handled by the previous
process, everything after it the durable delivers (again) to this one. Replaying exactly up to the
floor counts nothing twice and misses nothing, as long as nothing was acknowledged above the floor.
Only a message left unacknowledged while later ones were acknowledged (a handler that raised, a
dead-letter publish that failed) leaves such a gap: the events acknowledged above it are then
neither replayed nor delivered again. The caller must hold its durable's deliveries until the
replay has read the floor (else the floor moves under it).

Reads go through short-lived pull consumers with no acknowledgements (the server tracks nothing
per message) that are deleted afterwards; one that outlives a crash expires on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from shared.events import MalformedEvent, parse_event
from shared.pull import fetch

log = logging.getLogger(__name__)
T = TypeVar("T")
Parse = Callable[[bytes, str], Any]  # a message's data and subject -> what ``apply`` takes; MalformedEvent: skipped
FETCH_BATCH = 512
FETCH_TIMEOUT_S = 5.0
FETCH_ATTEMPTS = 3  # an empty fetch while the consumer says more are pending is retried, then the replay fails
EPHEMERAL_INACTIVE_S = 60.0  # a replay consumer left behind by a crash is removed by the server after this


@dataclass(frozen=True)
class ReplayPass:
    """One read of the stream: these subjects, from the first message or from a time on."""

    subjects: list[str]
    since: datetime | None = None  # None: from the beginning of the stream


class ReplayProgress(BaseModel):
    """What the replay did; shown in the monitor's /api/state."""

    status: str = "waiting"  # waiting | replaying | done | first_start | failed
    durable: str = ""
    up_to_seq: int | None = None  # the durable's ack floor (stream sequence) the replay stopped at
    events: int = 0  # replayed into the state
    skipped: int = 0  # malformed messages skipped
    seconds: float | None = None
    error: str | None = None


class ReplayIncomplete(Exception):
    """The stream stopped delivering before the replay reached the ack floor."""


async def ack_floor(js: JetStreamContext, stream: str, durable: str) -> int | None:
    """The stream sequence up to which ``durable`` acknowledged everything; None when it does not
    exist yet (a first start: the durable will deliver everything)."""
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        return None
    return info.ack_floor.stream_seq if info.ack_floor else 0


async def replay(js: JetStreamContext, stream: str, up_to_seq: int, passes: list[ReplayPass],
                 apply: Callable[[T], None], progress: ReplayProgress, parse: Parse = parse_event) -> None:
    """Feed every message of ``passes`` with a stream sequence up to ``up_to_seq`` to ``apply``, parsed
    (an event by default), in stream order within a pass. One that does not parse is skipped with a warning."""
    for replay_pass in passes:
        await _one_pass(js, stream, up_to_seq, replay_pass, apply, progress, parse)


async def _one_pass(js: JetStreamContext, stream: str, up_to_seq: int, replay_pass: ReplayPass,
                    apply: Callable[[T], None], progress: ReplayProgress, parse: Parse) -> None:
    name = f"replay-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subjects=replay_pass.subjects,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=EPHEMERAL_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
        max_ack_pending=-1,
        deliver_policy=DeliverPolicy.BY_START_TIME if replay_pass.since else DeliverPolicy.ALL,
        opt_start_time=replay_pass.since,
    )
    info = await js.add_consumer(stream, config)
    sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
    try:
        if not info.num_pending:
            return
        empty = 0
        while True:
            batch = await fetch(sub, FETCH_BATCH, FETCH_TIMEOUT_S)
            if not batch:
                empty += 1
                if empty >= FETCH_ATTEMPTS:
                    raise ReplayIncomplete(
                        f"no message from {stream} after {empty} fetches before sequence {up_to_seq}"
                    )
                continue
            empty = 0
            for msg in batch:
                meta = msg.metadata
                if meta.sequence.stream > up_to_seq:
                    return
                try:
                    item = parse(msg.data, msg.subject)
                except MalformedEvent as exc:
                    progress.skipped += 1
                    log.warning(
                        "replay: skipped malformed message %s at sequence %d: %s",
                        msg.subject,
                        meta.sequence.stream,
                        exc,
                    )
                else:
                    apply(item)
                    progress.events += 1
                if meta.sequence.stream == up_to_seq or meta.num_pending == 0:
                    return
            await asyncio.sleep(0)  # let HTTP (the progress) and heartbeats through between batches
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(stream, name)
        except Exception as exc:  # it expires on its own
            log.info("replay: consumer %s not deleted (%s); it expires in %.0fs", name, exc, EPHEMERAL_INACTIVE_S)


async def replay_until_ack_floor(
    js: JetStreamContext,
    stream: str,
    durable: str,
    passes: list[ReplayPass],
    apply: Callable[[T], None],
    progress: ReplayProgress,
    parse: Parse = parse_event,
) -> None:
    """The whole restore: read the durable's ack floor, replay up to it, fill in ``progress``.
    Never raises: a replay that fails leaves the state partial and says so in ``progress``."""
    started = time.perf_counter()
    progress.durable, progress.status = durable, "replaying"
    try:
        floor = await ack_floor(js, stream, durable)
        progress.up_to_seq = floor
        if not floor:  # no durable, or (as the service creates it before its start hooks) one that acked nothing
            progress.status = "first_start"
            return
        await replay(js, stream, floor, passes, apply, progress, parse)
        progress.status = "done"
    except Exception as exc:
        progress.status, progress.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("replay of %s for %s failed after %d events: %s", stream, durable, progress.events, progress.error)
    finally:
        progress.seconds = round(time.perf_counter() - started, 3)
        log.info(
            "replay of %s for %s: %s, %d events (%d malformed skipped) up to sequence %s in %.3fs",
            stream,
            durable,
            progress.status,
            progress.events,
            progress.skipped,
            progress.up_to_seq,
            progress.seconds,
        )
