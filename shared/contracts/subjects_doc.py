"""infra/SUBJECTS.md, generated from the service contracts and the event classes (`strata subjects`)."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Contract, Store, contracts, type_name
from shared.events import EventData


def _code(text: str) -> str:
    return f"`{text}`"


def _consumers(cls: type[EventData], every: list[Contract]) -> str:
    """Who takes an event, and where: ``service `module:function``` for each handler."""
    found = []
    for contract in every:
        for consumer in contract.consumes:
            found += [
                f"{contract.service} {_code(handler)}" for event, handler in consumer.handlers.items() if event is cls
            ]
        found += [
            f"{contract.service} {_code(sub.handler)} (core)"
            for sub in contract.subscriptions
            if subjects.matches(sub.subject, cls.subject())
        ]
    return "<br>".join(dict.fromkeys(found)) or "—"


def _every_event(every: list[Contract]) -> str:
    """The consumers that take every event (their rows would repeat on each event's)."""
    return ", ".join(
        f"{c.service} {_code(h)}" for c in every for k in c.consumes for t, h in k.handlers.items() if t is EventData
    )


def _registered_by(registrar: str) -> str:
    """Where a consumer or subscription that Service does not register is registered (its own loop)."""
    return f"<br>registered by {_code(registrar)}" if registrar else ""


def _access(store: Store) -> str:
    if store.owns:
        return "writes, purges" if store.purges else "writes"
    return "uses" if store.kind == "stream" else "reads"


def subjects_markdown() -> str:
    every = list(contracts().values())
    events = [
        f"| `{cls.subject()}` | {cls.PUBLISHER} | {_consumers(cls, every)} | {cls.VERSION} | "
        f"{'yes' if cls.PERSISTENT else 'no (live telemetry)'} |"
        for _, cls in sorted(EventData.registry.items())
    ]
    ops = [
        f"| `{op.subject}` | {type_name(op.request)} | {type_name(op.reply)} | {_code(op.handler)} | {op.summary}"
        f"{' (every worker answers: no queue group)' if op.every_replica else ''} |"
        for contract in every
        for op in contract.rpc
    ]
    subs = [
        f"| `{s.subject}` | {c.service} | {_code(s.handler)}{_registered_by(s.registered_by)} | "
        f"{s.queue or 'none: every replica'} | {s.purpose} |"
        for c in every
        for s in c.subscriptions
        if not s.subject.startswith(("evt.", "live."))
    ]
    consumers = [
        f"| `{k.durable}` | {c.service} | {k.stream} | `{k.filter}` | "
        + "<br>".join(
            f"{type_name(t) if t is not EventData else 'every event'}: {_code(h)}" for t, h in k.handlers.items()
        )
        + _registered_by(k.registered_by)
        + " |"
        for c in every
        for k in c.consumes
    ]
    stores = [f"| `{s.name}` | {s.kind} | {c.service} | {_access(s)} | {s.purpose} |" for c in every for s in c.stores]
    clients = [f"| {c.service} | {_code(c.client)} |" for c in every if c.client]
    return "\n".join(
        [
            "# Subjects, RPC ops and stores",
            "",
            "Generated from the service contracts (`shared/contracts/<service>.py`) and the event classes",
            "(`shared/events.py`, each class's `PUBLISHER`) by `strata subjects`; a test checks this file is current.",
            "Names come from `shared/subjects.py`. Each event type has exactly one publisher: `Service.publish`",
            "refuses any other, and each service's NATS credential (shared/nats_auth.py, from the same contracts)",
            "enforces it on the server. A handler is `module:function` (or `module:Class.method`): open that file.",
            "",
            "## Events",
            "",
            f"Every event kept in EVENTS is also handled by {_every_event(every)}.",
            "",
            "| subject | publisher | handled by | schema version | kept in EVENTS |",
            "|---|---|---|---|---|",
            *events,
            "",
            "## RPC ops",
            "",
            "`rpc.<service>.<op>`, request-reply with a typed error (shared/rpc.py). Every service also answers",
            "`rpc.<service>.health` (shared/service.py).",
            "",
            "| subject | request | reply | handled by | what |",
            "|---|---|---|---|---|",
            *ops,
            "",
            "## Inference and other core subscriptions",
            "",
            "`{model}` is the model's name as one subject token (shared/subjects.py `token`); the `.gateway` forms",
            "name the API key that asked, and only the api-gateway may publish there.",
            "",
            "| subject | service | handled by | queue group | what |",
            "|---|---|---|---|---|",
            *subs,
            "",
            "## Durable consumers",
            "",
            "| durable | service | stream | filter | handled by |",
            "|---|---|---|---|---|",
            *consumers,
            "",
            "## KV buckets, object stores and streams",
            "",
            "Dead letters go to `dlq.<service>` (stream DEADLETTER). `strata up` creates every stream and bucket",
            "(cli/provision.py); no service may.",
            "",
            "| name | kind | service | access | what |",
            "|---|---|---|---|---|",
            *stores,
            "",
            "## Typed clients",
            "",
            "| service | client |",
            "|---|---|",
            *clients,
            "",
        ]
    )
