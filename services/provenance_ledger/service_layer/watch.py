"""The ledger checks its own file without being asked (#19): tamper evidence that is looked at.

At start, in the background, every leaf is re-hashed: nothing watched the file while the ledger was
down, so a marker from before cannot vouch for bytes changed since (the service serves meanwhile and
says ``catching_up: ["ledger-verify"]`` on /healthz). Then every ``every_s`` a pass re-hashes only the
leaves after the marker of the last clean pass, and checks every signed head against all stored
hashes (cheap: 32 bytes a leaf, no parsing); every ``full_every_s`` a pass re-hashes everything again.
A clean pass moves the marker (``verified`` table); a failing one leaves it and hands the report on,
and the caller publishes each finding once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.provenance_ledger.config import WatchSettings
from services.provenance_ledger.service_layer.ledger import Ledger, verify_store
from shared.provenance import VerifyReport

log = logging.getLogger(__name__)
class TamperWatch:
    def __init__(
        self,
        directory: Path,
        ledger: Ledger,
        report: Callable[[VerifyReport], Awaitable[None]],
        settings: WatchSettings | None = None,
    ) -> None:
        self.directory, self.ledger, self.report = directory, ledger, report
        self.settings = settings or WatchSettings()
        self.passes = 0
        self._last_full = 0.0

    async def run(self, first_done: Callable[[], None]) -> None:
        """The start-up pass (full), then periodic ones, until cancelled. A pass that cannot run
        (the file unreadable for a moment) is logged and tried again at the next period."""
        full, first = True, True
        while True:
            try:
                await self.check(full=full)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the ledger's verify could not run; trying again in %.0fs", self.settings.every_s)
            if first:
                first_done()
                first = False
            await asyncio.sleep(self.settings.every_s)
            full = time.monotonic() - self._last_full >= self.settings.full_every_s

    async def check(self, *, full: bool) -> VerifyReport:
        start = 0 if full else self.ledger.store.verified_size() or 0
        began = time.monotonic()
        report = await asyncio.to_thread(verify_store, self.directory, start)
        self.passes += 1
        log.info(
            "ledger verify (%s, leaves %d..%d): %s in %.2fs",
            "full" if full else "incremental",
            start,
            report.leaves,
            "ok" if report.ok else f"{report.problems_total} problem(s)",
            time.monotonic() - began,
        )
        if full:
            self._last_full = began
        if report.ok:
            # written here, on the event loop, like every other write: never inside an ingest transaction
            self.ledger.store.set_verified(report.leaves, time.time_ns() // 1_000_000, full=full)
            if full:
                self.ledger.tamper = None  # an incremental pass did not look at older bytes: it clears nothing
        else:
            self.ledger.tamper = report
            await self.report(report)
        return report
