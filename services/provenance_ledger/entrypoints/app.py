"""provenance-ledger: appends every event to a verifiable Merkle log, signs tree heads, serves
proofs, receipts, lineage, audit and exports over HTTP (OpenAPI) and NATS RPC."""

from __future__ import annotations

import logging

from services.provenance_ledger.entrypoints.routes import router
from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from shared.apikey_http import protect
from shared.config import Settings
from shared.contracts.provenance_ledger import CONTRACT
from shared.provenance import LedgerStats
from shared.service import Service

log = logging.getLogger(__name__)
NAME = CONTRACT.service


def create_service(settings: Settings | None = None) -> Service:
    service = Service(
        NAME,
        settings,
        description="A tamper-evident Merkle log of every event, with receipts, lineage and exports. "
        "Its leaf contents (leaves, receipts, lineage, audit, exports) need a key with the 'read' scope; "
        "an 'inference' key may fetch the receipts of its own requests.",
    )

    # Its ops reach the LedgerApp as a part: provided once its ledger is open, so until then they answer 503.
    async def open_ledger() -> None:
        service.provide(await LedgerApp.open(service))

    async def close_ledger() -> None:
        app = service.withdraw(LedgerApp)
        if app is not None:
            await app.stop()

    service.on_start(open_ledger)
    service.on_stop(close_ledger)
    protect(service)
    service.serve(CONTRACT)
    service.http.include_router(router)
    _metrics(service)
    return service


def _metrics(service: Service) -> None:
    """The ledger's figures at /metrics, read from its stats on every scrape (none while starting)."""

    def stats() -> list[LedgerStats]:
        return [service.part(LedgerApp).stats()] if service.has(LedgerApp) else []

    m = service.metrics
    m.gauges("strata_ledger_tree_size", "Leaves in the Merkle log", [], lambda: [([], s.tree_size) for s in stats()])
    m.gauges(
        "strata_ledger_verified_size",
        "Leaves re-hashed and matching at the last clean verify",
        [],
        lambda: [([], s.verified_size) for s in stats() if s.verified_size is not None],
    )
    m.gauges(
        "strata_ledger_tamper_suspected",
        "1 while a verify has found the file changed",
        [],
        lambda: [([], float(s.tamper_suspected)) for s in stats()],
    )
    m.gauges(
        "strata_ledger_last_verify_timestamp_seconds",
        "When the last clean verify ran",
        [],
        lambda: [([], s.verified_at.timestamp()) for s in stats() if s.verified_at is not None],
    )
    m.counters(
        "strata_ledger_leaves",
        "Events taken into the log, by outcome (appended: new leaves; duplicate: "
        "seen before; conflict: an earlier id with other content)",
        ["outcome"],
        lambda: (
            [(["appended"], s.appended) for s in stats()]
            + [(["duplicate"], s.duplicates) for s in stats()]
            + [(["conflict"], s.conflicts) for s in stats()]
        ),
    )
    m.counters(
        "strata_ledger_ingest_failures",
        "Ingest failures (retried)",
        [],
        lambda: [([], s.ingest_failures) for s in stats()],
    )
