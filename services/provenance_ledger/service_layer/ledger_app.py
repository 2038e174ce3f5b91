"""The running ledger: its Ledger, its event ingest and its tamper watch, once started; one method per
RPC op of the ledger's contract (shared/contracts/provenance_ledger.py), which the HTTP routes call too."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from services.provenance_ledger.adapters.ingest import EventIngest
from services.provenance_ledger.domain import exports
from services.provenance_ledger.service_layer import queries
from services.provenance_ledger.config import LedgerConfig
from services.provenance_ledger.service_layer.ledger import Ledger
from services.provenance_ledger.service_layer.watch import TamperWatch
from shared import errors
from shared.events import LedgerCheckpoint, TamperDetected
from shared.provenance import (
    AuditEntry, AuditRequest, ConsistencyProof, ConsistencyRequest, ExportRequest, HeadResponse, InclusionProof,
    InclusionRequest, LedgerStats, PublicKey, Receipt, VerifyReport, ms_to_datetime,
)
from shared.service import Service
from shared.signing_keys import short_key_id

log = logging.getLogger(__name__)
NAME = "provenance-ledger"
MAX_TAMPER_EVENTS = 10


class LedgerApp:
    """The running ledger: its Ledger, its event ingest and its tamper watch, all open. ``open`` makes
    one at the service's start, and app.py provides it then: until it is, every op answers 503."""

    def __init__(self, service: Service, ledger: Ledger, config: LedgerConfig) -> None:
        self.service = service
        self.ledger = ledger
        self.watch = TamperWatch(service.settings.service_dir, ledger, self.report_tamper, config.watch)
        self.ingest = EventIngest(service.broker.connection, ledger, service=NAME, ack_wait_s=config.ack_wait_s,
                                  after_commit=self.checkpoint_if_due)
        self._watching: asyncio.Task[None] | None = None
        self._reported: set[tuple[int, str]] = set()  # findings already published: each one once

    @classmethod
    async def open(cls, service: Service) -> LedgerApp:
        """Open the ledger's file, report what tamper its opening found, then start the watch and the ingest."""
        config = LedgerConfig.from_env()  # a bad setting stops the start, with its name
        app = cls(service, Ledger.open(service.settings.service_dir, config.checkpoint), config)
        await app._start()
        return app

    async def _start(self) -> None:
        if self.ledger.tamper is not None:
            await self.report_tamper(self.ledger.tamper)
        self.service.catching_up.add("ledger-verify")  # /healthz names it until the start-up pass is done
        self._watching = asyncio.create_task(self.watch.run(lambda: self.service.catching_up.discard("ledger-verify")),
                                             name="ledger-verify")
        await self.ingest.start()

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)  # a pass in its thread finishes first
        await self.ingest.stop()
        self.ledger.close()
        log.info("ledger stopped")

    async def checkpoint_if_due(self) -> None:
        if self.ledger.checkpoint_due():
            await self.checkpoint()

    async def checkpoint(self) -> Any:
        head = self.ledger.sign()
        try:
            await self.service.publish(LedgerCheckpoint(
                tree_size=head.tree_size, root_hash=head.root_hash, signature=head.signature,
                key_id=head.key_id, signed_at=head.signed_at,
            ))
        except Exception:  # the head is kept either way; the next one is published
            log.exception("could not publish the checkpoint at size %d", head.tree_size)
        return head

    async def report_tamper(self, report: VerifyReport) -> None:
        """Publish each finding once (by leaf index and kind), at most MAX_TAMPER_EVENTS per report:
        the periodic verify sees a finding again at every pass until someone repairs the file."""
        new = [p for p in report.problems if (p.index, p.kind) not in self._reported][:MAX_TAMPER_EVENTS]
        for problem in new:
            self._reported.add((problem.index, problem.kind))
            log.error("ledger tamper: leaf %d %s: %s", problem.index, problem.kind, problem.detail)
            try:
                await self.service.publish(
                    TamperDetected(index=problem.index, reason=f"{problem.kind}: {problem.detail}")
                )
            except Exception:
                log.exception("could not publish tamper_detected")

    async def verify(self) -> VerifyReport:
        """The full verify on demand: the same pass as the periodic full one (it moves the marker too)."""
        return await self.watch.check(full=True)

    # -- API ---------------------------------------------------------------------------------
    def head(self) -> HeadResponse:
        lg = self.ledger
        return HeadResponse(tree_size=lg.size, root_hash=lg.root().hex(), signed=lg.latest_head())

    def inclusion(self, req: InclusionRequest) -> InclusionProof:
        lg = self.ledger
        index = req.index if req.index is not None else lg.index_of(req.event_id or "")
        if index >= lg.size:
            raise errors.NotFound(f"no leaf at index {index} (the log has {lg.size})")
        head = None
        if req.tree_size is None:
            head = lg.head_covering(index)
            size = head.tree_size
        else:
            size = req.tree_size
            head = next((h for h in lg.store.heads() if h.tree_size == size), None)
        proof = lg.inclusion(index, size)
        return InclusionProof(
            leaf_index=index,
            tree_size=size,
            leaf_hash=lg.tree.leaf(index).hex(),
            root_hash=lg.root(size).hex(),
            proof=[p.hex() for p in proof],
            tree_head=head,
        )

    def consistency(self, req: ConsistencyRequest) -> ConsistencyProof:
        lg = self.ledger
        second = lg.size if req.second is None else req.second
        proof = lg.consistency(req.first, second)
        return ConsistencyProof(
            first=req.first,
            second=second,
            first_root=lg.root(req.first).hex(),
            second_root=lg.root(second).hex(),
            proof=[p.hex() for p in proof],
        )

    def export(self, req: ExportRequest) -> dict[str, Any]:
        head = self.ledger.latest_head()
        facts = queries.model_facts(self.ledger.store, req.ref, head.model_dump() if head else None)
        return exports.in_toto_statement(facts) if req.format == "in-toto" else exports.cyclonedx_ml_bom(facts)

    def audit(self, req: AuditRequest) -> list[AuditEntry]:
        since = queries.parse_since(req.since) if req.since else None
        rows = queries.audit(self.ledger.store, since_ms=since, model=req.model, event_type=req.type, limit=req.limit)
        return [AuditEntry(**r) for r in rows]

    def public_key(self) -> PublicKey:
        return PublicKey(pem=self.ledger.public_key_pem, key_id=short_key_id(self.ledger.key.public_key()))

    def stats(self) -> LedgerStats:
        lg, ing = self.ledger, self.ingest
        verified = lg.store.verified()
        return LedgerStats(
            tree_size=lg.size,
            appended=lg.stats.appended,
            duplicates=lg.stats.duplicates,
            conflicts=lg.stats.conflicts,
            batches=lg.stats.batches,
            dead_lettered=ing.dead_lettered,
            ingest_running=ing.running,
            ingest_failures=ing.failures,
            last_error=ing.last_error,
            tamper_suspected=lg.tamper is not None,
            verified_size=verified["size"] if verified else None,
            verified_at=_when(verified["at_ms"]) if verified else None,
            full_verify_at=_when(verified["full_at_ms"]) if verified else None,
        )

    # -- the ops that read the store ------------------------------------------------------------
    def receipt(self, request_id: str, made_with: str | None = None) -> Receipt:
        return self.ledger.receipt(request_id, made_with=made_with)

    def request_lineage(self, request_id: str) -> dict[str, Any]:
        return queries.request_lineage(self.ledger.store, request_id)

    def dataset_lineage(self, digest: str) -> dict[str, Any]:
        return queries.dataset_lineage(self.ledger.store, digest)

    def model_lineage(self, ref: str) -> dict[str, Any]:
        return queries.model_lineage(self.ledger.store, ref)


def _when(ms: int | None) -> datetime | None:
    return ms_to_datetime(ms) if ms is not None else None
