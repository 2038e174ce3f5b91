"""What each service offers and uses on NATS, declared once: ``shared/contracts/<service>.py``.

A service's contract names its RPC ops (request and reply types, and the function that handles each),
the durable consumers it reads events with, its core NATS subscriptions, the KV buckets, object stores
and streams it uses, and the RPC ops and subjects it calls on others. The events it publishes are those
whose ``PUBLISHER`` it is (shared/events.py). From these declarations come:

- the services' RPC registration (``Service.serve(contract)``): an op is served by the handler named
  next to it, so grepping an op's name finds its handler; and their event consumers
  (``Service.consume_declared(contract)``), each event type routed to the handler named next to it;
- the NATS permissions of each service's credential (shared/nats_auth.py);
- infra/SUBJECTS.md (``subjects_markdown()``, ``strata subjects``), with a "handled by" column;
- the channels of each service's /asyncapi.json that FastStream cannot see (``Service.asyncapi``).

A handler is written ``module:qualified.name`` (``services.x.service_layer.y:Class.method``): the
contract names it without importing it, so that shared/ never imports a service.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from shared import subjects
from shared.events import EventData

TypeRef = Any  # a pydantic model, or a type expression such as list[X] or dict


def resolve(ref: str | Any) -> Any:
    """The object a ``module:qualified.name`` reference names (anything else is returned as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, qualname = ref.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def type_name(ref: TypeRef) -> str:
    if isinstance(ref, type):
        return ref.__name__
    return re.sub(r"[\w.]+\.", "", str(ref))  # "list[shared.provenance.AuditEntry]" -> "list[AuditEntry]"


@dataclass(frozen=True)
class RpcOp:
    """``rpc.<service>.<op>``: a typed request-reply (shared/rpc.py). ``handler`` is a method of the
    service-layer part that ``Service.provide`` holds (``module:Class.method``), called with the request;
    it answers 503 while the service is starting. ``every_replica``: no queue group, every replica
    answers and the caller gathers the replies."""

    service: str
    op: str
    request: TypeRef
    reply: TypeRef
    handler: str
    summary: str = ""
    every_replica: bool = False

    @property
    def subject(self) -> str:
        return subjects.rpc(self.service, self.op)


@dataclass(frozen=True)
class Consumes:
    """Events read through a durable JetStream consumer on ``stream``, filtered to ``filter``: each
    message type in ``handlers`` goes to its handler (``EventData``: every event). ``durable`` may be a
    pattern (``{node}``, ``{model}``): one durable per node or model, which the permissions cannot name.

    ``Service.consume_declared(contract)`` runs it, unless ``registered_by`` names the code that does
    instead (``module:qualified.name``), where Service's consumer cannot: its docstring says why."""

    durable: str
    filter: str
    handlers: dict[type[BaseModel], str]
    stream: str = subjects.EVENTS_STREAM
    purpose: str = ""
    registered_by: str = ""

    @property
    def fixed_durable(self) -> bool:
        return "{" not in self.durable


@dataclass(frozen=True)
class Subscription:
    """A core NATS subscription. ``subject`` as AsyncAPI writes it (``{model}`` for a variable token);
    ``permits``: the subscribe permission that covers it (default: the subject itself)."""

    subject: str
    handler: str
    purpose: str
    queue: str | None = None  # a queue group ('per model', the service name) or None: every replica hears it
    permits: str | None = None
    # the code that subscribes it with nats-py (``module:qualified.name``: its docstring says why), where
    # Service.subscribe does not
    registered_by: str = ""

    @property
    def permission(self) -> str:
        return self.permits or self.subject


@dataclass(frozen=True)
class Store:
    """A KV bucket, object store or stream the service uses. ``owns``: it writes there (and no other
    service does); ``purges``: it may purge the store's stream (only a store it alone writes)."""

    name: str
    kind: Literal["kv", "object", "stream"]
    owns: bool = False
    purges: bool = False
    purpose: str = ""

    @property
    def stream(self) -> str:
        return {"kv": subjects.kv_stream, "object": subjects.obj_stream, "stream": str}[self.kind](self.name)

    @property
    def writes(self) -> str | None:
        """The subjects its writes go to, when it owns a bucket or object store (a stream's writes are sends)."""
        if not self.owns or self.kind == "stream":
            return None
        return subjects.kv_writes(self.name) if self.kind == "kv" else subjects.obj_writes(self.name)


@dataclass(frozen=True)
class Contract:
    service: str
    summary: str
    rpc: tuple[RpcOp, ...] = ()
    consumes: tuple[Consumes, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()
    stores: tuple[Store, ...] = ()
    calls: tuple[RpcOp, ...] = ()  # other services' RPC ops it calls
    sends: tuple[str, ...] = ()  # further subjects it publishes to (requests, results, cancels)
    event_streams: tuple[str, ...] = (subjects.EVENTS_STREAM, subjects.DEADLETTER_STREAM)  # it binds to at start
    client: str = ""  # where its typed client lives, ``module:Name``

    def __post_init__(self) -> None:
        for op in self.rpc:
            if op.service != self.service:
                raise ValueError(f"{self.service}'s contract declares {op.subject}")

    @property
    def publishes(self) -> list[type[EventData]]:
        """Its events: those whose PUBLISHER it is (shared/events.py, the one definition of that)."""
        return sorted(
            (c for c in EventData.registry.values() if c.PUBLISHER == self.service), key=lambda c: c.subject()
        )

    def op(self, name: str) -> RpcOp:
        return next(op for op in self.rpc if op.op == name)

    def self_registered(self) -> list[Consumes | Subscription]:
        """Its consumers and subscriptions that code of its own registers (``registered_by``), not Service."""
        return [d for d in (*self.consumes, *self.subscriptions) if d.registered_by]

    def handlers(self) -> list[str]:
        """Every handler it names (tests check that each exists)."""
        return [
            *(op.handler for op in self.rpc),
            *(h for c in self.consumes for h in c.handlers.values()),
            *(s.handler for s in self.subscriptions),
        ]


def contracts() -> dict[str, Contract]:
    """Every service's contract, by service name, in shared/config.py's SERVICES order."""
    from shared.config import SERVICES
    from shared.contracts import (
        api_gateway,
        hardware_inventory,
        inference,
        model_store,
        monitor,
        provenance_ledger,
    )

    found = {
        c.CONTRACT.service: c.CONTRACT
        for c in (model_store, hardware_inventory, inference, provenance_ledger, monitor, api_gateway)
    }
    return {name: found[name] for name in SERVICES}


def contract(service: str) -> Contract:
    return contracts()[service]
