"""provenance-ledger: appends every event to a verifiable Merkle log, signs tree heads, serves
proofs, receipts, lineage, audit and exports over HTTP (OpenAPI) and NATS RPC."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from typing import Any

from fastapi import Depends, Query
from fastapi.responses import PlainTextResponse, Response

from services.provenance_ledger.adapters.ingest import ACK_WAIT_S, EventIngest
from services.provenance_ledger.domain import exports
from services.provenance_ledger.domain.receipt import Receipt
from services.provenance_ledger.domain.tree_head import ms_to_datetime
from services.provenance_ledger.domain.verify import VerifyReport
from services.provenance_ledger.entrypoints.access import only_requests_of, receipt_caller
from services.provenance_ledger.entrypoints.api import (
    AuditEntry, AuditRequest, ConsistencyProof, ConsistencyRequest, DatasetRef, Empty, ExportRequest,
    HeadResponse, InclusionProof, InclusionRequest, LedgerStats, ModelLineageRef, PublicKey, RequestRef,
)
from services.provenance_ledger.service_layer import queries
from services.provenance_ledger.service_layer.ledger import CheckpointPolicy, Ledger
from services.provenance_ledger.service_layer.watch import TamperWatch, WatchSettings
from shared import errors
from shared.apikey_http import protect
from shared.apikeys import ApiKeyRecord
from shared.config import Settings
from shared.events import LedgerCheckpoint, TamperDetected
from shared.http_errors import error_responses
from shared.service import Service
from shared.signing_keys import short_key_id

log = logging.getLogger(__name__)
NAME = "provenance-ledger"
MAX_TAMPER_EVENTS = 10


def _policy() -> CheckpointPolicy:
    return CheckpointPolicy(
        every_events=int(os.environ.get("STRATA_LEDGER_CHECKPOINT_EVENTS", 1000)),
        every_seconds=float(os.environ.get("STRATA_LEDGER_CHECKPOINT_SECONDS", 10)),
    )


class LedgerApp:
    """The running ledger: the service, its Ledger and its ingest; the API handlers below call it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.ledger: Ledger | None = None
        self.ingest: EventIngest | None = None
        self.watch: TamperWatch | None = None
        self._watching: asyncio.Task[None] | None = None
        self._reported: set[tuple[int, str]] = set()  # findings already published: each one once

    @property
    def lg(self) -> Ledger:
        if self.ledger is None:
            raise errors.Unavailable("the ledger is starting")
        return self.ledger

    async def start(self) -> None:
        watch_settings = WatchSettings.from_env()  # a bad setting stops the start, with its name
        self.ledger = Ledger.open(self.service.settings.service_dir, _policy())
        if self.ledger.tamper is not None:
            await self.report_tamper(self.ledger.tamper)
        self.watch = TamperWatch(self.service.settings.service_dir, self.ledger, self.report_tamper, watch_settings)
        self.service.catching_up.add("ledger-verify")  # /healthz names it until the start-up pass is done
        self._watching = asyncio.create_task(self.watch.run(lambda: self.service.catching_up.discard("ledger-verify")),
                                             name="ledger-verify")
        # After a crash, the batch it had fetched but not acknowledged comes back only after the ack wait:
        # a shorter one (STRATA_LEDGER_ACK_WAIT_SECONDS) catches up sooner, a redelivery is appended once.
        ack_wait = float(os.environ.get("STRATA_LEDGER_ACK_WAIT_SECONDS", ACK_WAIT_S))
        self.ingest = EventIngest(self.service.broker.connection, self.ledger, service=NAME, ack_wait_s=ack_wait,
                                  after_commit=self.checkpoint_if_due)
        await self.ingest.start()

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)  # a pass in its thread finishes first
        if self.ingest is not None:
            await self.ingest.stop()
        if self.ledger is not None:
            self.ledger.close()
        log.info("ledger stopped")

    async def checkpoint_if_due(self) -> None:
        if self.ledger is not None and self.ledger.checkpoint_due():
            await self.checkpoint()

    async def checkpoint(self) -> Any:
        head = self.lg.sign()
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
                await self.service.publish(TamperDetected(index=problem.index, reason=f"{problem.kind}: {problem.detail}"))
            except Exception:
                log.exception("could not publish tamper_detected")

    async def verify(self) -> VerifyReport:
        """The full verify on demand: the same pass as the periodic full one (it moves the marker too)."""
        if self.watch is None:
            raise errors.Unavailable("the ledger is starting")
        return await self.watch.check(full=True)

    # -- API ---------------------------------------------------------------------------------
    def head(self) -> HeadResponse:
        lg = self.lg
        return HeadResponse(tree_size=lg.size, root_hash=lg.root().hex(), signed=lg.latest_head())

    def inclusion(self, req: InclusionRequest) -> InclusionProof:
        lg = self.lg
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
        return InclusionProof(leaf_index=index, tree_size=size, leaf_hash=lg.tree.leaf(index).hex(),
                              root_hash=lg.root(size).hex(), proof=[p.hex() for p in proof], tree_head=head)

    def consistency(self, req: ConsistencyRequest) -> ConsistencyProof:
        lg = self.lg
        second = lg.size if req.second is None else req.second
        proof = lg.consistency(req.first, second)
        return ConsistencyProof(first=req.first, second=second, first_root=lg.root(req.first).hex(),
                                second_root=lg.root(second).hex(), proof=[p.hex() for p in proof])

    def export(self, req: ExportRequest) -> dict[str, Any]:
        head = self.lg.latest_head()
        facts = queries.model_facts(self.lg.store, req.ref, head.model_dump() if head else None)
        return exports.in_toto_statement(facts) if req.format == "in-toto" else exports.cyclonedx_ml_bom(facts)

    def audit(self, req: AuditRequest) -> list[AuditEntry]:
        since = queries.parse_since(req.since) if req.since else None
        rows = queries.audit(self.lg.store, since_ms=since, model=req.model, event_type=req.type, limit=req.limit)
        return [AuditEntry(**r) for r in rows]

    def public_key(self) -> PublicKey:
        return PublicKey(pem=self.lg.public_key_pem, key_id=short_key_id(self.lg.key.public_key()))

    def stats(self) -> LedgerStats:
        lg, ing = self.lg, self.ingest
        verified = lg.store.verified()
        return LedgerStats(
            tree_size=lg.size, appended=lg.stats.appended, duplicates=lg.stats.duplicates, conflicts=lg.stats.conflicts,
            batches=lg.stats.batches, dead_lettered=ing.dead_lettered if ing else 0, ingest_running=bool(ing and ing.running),
            ingest_failures=ing.failures if ing else 0, last_error=ing.last_error if ing else None, tamper_suspected=lg.tamper is not None,
            verified_size=verified["size"] if verified else None, verified_at=_when(verified["at_ms"]) if verified else None,
            full_verify_at=_when(verified["full_at_ms"]) if verified else None,
        )


def _when(ms: int | None) -> datetime | None:
    return ms_to_datetime(ms) if ms is not None else None


def create_service(settings: Settings | None = None) -> Service:
    service = Service(NAME, settings, description="A tamper-evident Merkle log of every event, with receipts, lineage and exports. "
                      "Its leaf contents (leaves, receipts, lineage, audit, exports) need a key with the 'read' scope; "
                      "an 'inference' key may fetch the receipts of its own requests.")
    app = LedgerApp(service)
    service.ledger_app = app  # type: ignore[attr-defined]  (tests and bench reach the running ledger)
    service.on_start(app.start)
    service.on_stop(app.stop)
    _routes(service, app)
    _rpcs(service, app)
    _metrics(service, app)
    return service


def _metrics(service: Service, app: LedgerApp) -> None:
    """The ledger's figures at /metrics, read from its stats on every scrape (none while starting)."""
    def stats() -> list[LedgerStats]:
        return [app.stats()] if app.ledger is not None else []

    m = service.metrics
    m.gauges("strata_ledger_tree_size", "Leaves in the Merkle log", [], lambda: [([], s.tree_size) for s in stats()])
    m.gauges("strata_ledger_verified_size", "Leaves re-hashed and matching at the last clean verify", [],
             lambda: [([], s.verified_size) for s in stats() if s.verified_size is not None])
    m.gauges("strata_ledger_tamper_suspected", "1 while a verify has found the file changed", [],
             lambda: [([], float(s.tamper_suspected)) for s in stats()])
    m.gauges("strata_ledger_last_verify_timestamp_seconds", "When the last clean verify ran", [],
             lambda: [([], s.verified_at.timestamp()) for s in stats() if s.verified_at is not None])
    m.counters("strata_ledger_leaves", "Events taken into the log, by outcome (appended: new leaves; duplicate: "
               "seen before; conflict: an earlier id with other content)", ["outcome"],
               lambda: [(["appended"], s.appended) for s in stats()] + [(["duplicate"], s.duplicates) for s in stats()]
               + [(["conflict"], s.conflicts) for s in stats()])
    m.counters("strata_ledger_ingest_failures", "Ingest failures (retried)", [],
               lambda: [([], s.ingest_failures) for s in stats()])


def _routes(service: Service, app: LedgerApp) -> None:
    http = service.http
    tags = ["ledger"]
    auth = protect(service)
    admin = [Depends(auth.require("admin"))]  # signing a head now
    reader = [Depends(auth.require("read"))]  # leaf contents (access.py); public material stays open
    starting = error_responses(errors.Unavailable)  # every route answers 503 until the ledger is open
    missing = error_responses(errors.NotFound, errors.Unavailable)
    read_missing = error_responses(errors.NotFound, errors.Unavailable, auth=True)

    @http.get("/head", response_model=HeadResponse, tags=tags, summary="current size and root, and the latest signed tree head",
              responses=starting)
    async def head() -> HeadResponse:
        return app.head()

    @http.post("/checkpoint", tags=tags, summary="sign a tree head now (and publish it as ledger.checkpoint)",
               dependencies=admin, responses=error_responses(errors.Unavailable, auth=True))
    async def checkpoint() -> Any:
        return await app.checkpoint()

    @http.get("/heads", tags=tags, summary="every signed tree head", responses=starting)
    async def heads() -> Any:
        return app.lg.store.heads()

    # response_class=Response, not PlainTextResponse: FastAPI documents every response of a route in the route's
    # media type, and the 503 is the typed JSON error; the 200 says text/plain itself
    @http.get("/public-key", response_class=Response, tags=tags, summary="the Ed25519 public key (PEM) that signs tree heads",
              responses={200: {"description": "the PEM", "content": {"text/plain": {"schema": {"type": "string"}}}}, **starting})
    async def public_key() -> PlainTextResponse:
        return PlainTextResponse(app.lg.public_key_pem)

    @http.get("/proof/inclusion", response_model=InclusionProof, tags=tags,
              responses=error_responses(errors.Invalid, errors.NotFound, errors.Unavailable))
    async def inclusion(index: int | None = Query(None, ge=0), event_id: str | None = None, tree_size: int | None = Query(None, ge=1)) -> InclusionProof:
        try:
            req = InclusionRequest(index=index, event_id=event_id, tree_size=tree_size)
        except ValueError as exc:
            raise errors.Invalid(str(exc)) from None
        return app.inclusion(req)

    @http.get("/proof/consistency", response_model=ConsistencyProof, tags=tags,
              responses=error_responses(errors.Invalid, errors.Unavailable))
    async def consistency(first: int = Query(ge=0), second: int | None = Query(None, ge=0)) -> ConsistencyProof:
        return app.consistency(ConsistencyRequest(first=first, second=second))

    @http.get("/leaves/{index}", tags=tags, summary="a stored event and its leaf hash (key with scope read)",
              dependencies=reader, responses=read_missing)
    async def leaf(index: int) -> Any:
        event, h = app.lg.leaf(index)
        return {"leaf_index": index, "leaf_hash": h.hex(), "event": event}

    @http.get("/receipts/{request_id}", response_model=Receipt, tags=tags,
              summary="an inference receipt, verifiable offline (scope read; or inference, for that key's own requests)",
              responses=read_missing)
    async def receipt(request_id: str, caller: ApiKeyRecord | None = Depends(receipt_caller(auth))) -> Receipt:
        return app.lg.receipt(request_id, made_with=only_requests_of(caller))

    @http.post("/verify", response_model=VerifyReport, tags=tags, summary="re-hash every leaf and check every signed head",
               responses=missing)
    async def verify() -> VerifyReport:
        return await app.verify()

    @http.get("/lineage/requests/{request_id}", tags=["lineage"], dependencies=reader, responses=read_missing)
    async def lineage(request_id: str) -> dict[str, Any]:
        return queries.request_lineage(app.lg.store, request_id)

    @http.get("/lineage/datasets/{digest}", tags=["lineage"], dependencies=reader, responses=read_missing)
    async def dataset(digest: str) -> dict[str, Any]:
        return queries.dataset_lineage(app.lg.store, digest)

    @http.get("/lineage/models/{ref}", tags=["lineage"], dependencies=reader, responses=read_missing,
              summary="a model version's origin (import source, or the versions it was converted from) and its derivatives")
    async def model_lineage(ref: str) -> dict[str, Any]:
        return queries.model_lineage(app.lg.store, ModelLineageRef(ref=ref).ref)

    @http.get("/audit", response_model=list[AuditEntry], tags=["lineage"], dependencies=reader,
              responses=error_responses(errors.Invalid, errors.Unavailable, auth=True))
    async def audit(since: str | None = None, model: str | None = None, type: str | None = None, limit: int = Query(1000, ge=1, le=100_000)) -> list[AuditEntry]:
        return app.audit(AuditRequest(since=since, model=model, type=type, limit=limit))

    @http.get("/exports/{ref}", tags=["exports"], summary="in-toto Statement v1 (SLSA provenance) or CycloneDX 1.6 ML-BOM",
              dependencies=reader, responses=read_missing)
    async def export(ref: str, format: str = Query("in-toto", pattern="^(in-toto|cyclonedx)$")) -> dict[str, Any]:
        return app.export(ExportRequest(ref=ref, format=format))  # type: ignore[arg-type]

    @http.get("/stats", response_model=LedgerStats, tags=tags, responses=starting)
    async def stats() -> LedgerStats:
        return app.stats()


def _rpcs(service: Service, app: LedgerApp) -> None:
    async def head(_: Empty) -> HeadResponse:
        return app.head()

    async def checkpoint(_: Empty) -> Any:
        return await app.checkpoint()

    async def inclusion(req: InclusionRequest) -> InclusionProof:
        return app.inclusion(req)

    async def consistency(req: ConsistencyRequest) -> ConsistencyProof:
        return app.consistency(req)

    async def receipt(req: RequestRef) -> Receipt:
        return app.lg.receipt(req.request_id)

    async def verify(_: Empty) -> VerifyReport:
        return await app.verify()

    async def lineage(req: RequestRef) -> dict[str, Any]:
        return queries.request_lineage(app.lg.store, req.request_id)

    async def dataset_lineage(req: DatasetRef) -> dict[str, Any]:
        return queries.dataset_lineage(app.lg.store, req.digest)

    async def model_lineage(req: ModelLineageRef) -> dict[str, Any]:
        return queries.model_lineage(app.lg.store, req.ref)

    async def audit(req: AuditRequest) -> list[dict[str, Any]]:
        return [e.model_dump() for e in app.audit(req)]

    async def export(req: ExportRequest) -> dict[str, Any]:
        return app.export(req)

    async def public_key(_: Empty) -> PublicKey:
        return app.public_key()

    async def stats(_: Empty) -> LedgerStats:
        return app.stats()

    for op, request_type, handler in [
        ("head", Empty, head), ("checkpoint", Empty, checkpoint), ("inclusion", InclusionRequest, inclusion),
        ("consistency", ConsistencyRequest, consistency), ("receipt", RequestRef, receipt), ("verify", Empty, verify),
        ("lineage", RequestRef, lineage), ("dataset_lineage", DatasetRef, dataset_lineage),
        ("model_lineage", ModelLineageRef, model_lineage), ("audit", AuditRequest, audit),
        ("export", ExportRequest, export), ("public_key", Empty, public_key), ("stats", Empty, stats),
    ]:
        service.rpc(op, request_type)(handler)
