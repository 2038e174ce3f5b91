"""Per-role NATS credentials and permissions, derived from the service contracts (shared/contracts).

Each service connects as its own user. It may publish only the events whose ``PUBLISHER`` it is
(``shared/events.py``, the table in infra/SUBJECTS.md), its dead letters, the RPCs and inference
subjects its contract calls and sends, and writes to the KV buckets / object stores it owns. Its JetStream API access is
stream info on what it looks up and consumers on what it reads, never on another role's durables;
no service may create, update or delete a stream, KV bucket or object store, nor purge one it does not
alone write (model-store purges its blob store's partial objects). ``admin`` is
`strata up`'s bootstrap credential, the only one that may (cli/provision.py). ``client`` is the role
of the CLI (cli/connection.py reads its credential from the data dir): it may request deploys and
inferences, call RPCs and read events, and may publish no service event. ``operator`` is the role of
`strata key`: the one writer of the API keys bucket. ``app`` is the credential for a user's own
program on the serving contract (README, "Over NATS"): it may send inference requests and jobs and
read job results, nothing else (no event, no RPC, no stream change). Each role reads replies only on its own inbox
prefix (``inbox_prefix``). `strata up` refuses connections that give no credential
(``anonymous_client=False``); ``anonymous_client=True`` would hand them the ``client`` role.
docs/operations.md holds ``permissions_table()``.

``write(data_dir)`` creates the passwords once (``<data_dir>/nats/auth/<user>.json``, mode 0600, in a
0700 folder) and the nats-server config that names them; ``rotate(data_dir)`` makes new ones.
A process reads its own from ``STRATA_NATS_USER`` / ``STRATA_NATS_PASSWORD`` (``with_env_credentials``).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from shared import subjects
from shared.catalog import BLOB_BUCKET, CATALOG_BUCKET
from shared.config import SERVICES
from shared.contracts import Contract, contracts
from shared.events import EventData
from shared.inference import JOBS_STREAM, RESULTS_STREAM

CLIENT, APP, OPERATOR, ADMIN = "client", "app", "operator", "admin"
# A model's request subjects with nothing after the model: the attributed ones (subjects.ATTRIBUTED, one
# token more) are the api-gateway's alone.
PLAIN_REQUESTS = (subjects.inference_requests(any_suffix=False), subjects.embedding_requests(any_suffix=False))
USER_ENV, PASSWORD_ENV = "STRATA_NATS_USER", "STRATA_NATS_PASSWORD"
INBOX = "_INBOX"
INVENTORY_BUCKET, API_KEYS_BUCKET, QUOTAS_BUCKET = (
    subjects.INVENTORY_BUCKET,
    subjects.API_KEYS_BUCKET,
    subjects.QUOTAS_BUCKET,
)
EVENT_STREAMS = (subjects.EVENTS_STREAM, subjects.DEADLETTER_STREAM)


kv_stream, obj_stream = subjects.kv_stream, subjects.obj_stream


# Every stream, KV bucket and object store the platform uses: `strata up` creates them as ADMIN
# (cli/provision.py) before any service starts; nobody else may create, change or delete one.
ALL_STREAMS = (
    *EVENT_STREAMS,
    JOBS_STREAM,
    RESULTS_STREAM,
    kv_stream(CATALOG_BUCKET),
    obj_stream(BLOB_BUCKET),
    kv_stream(INVENTORY_BUCKET),
    kv_stream(API_KEYS_BUCKET),
    kv_stream(QUOTAS_BUCKET),
)


@dataclass(frozen=True)
class Needs:
    """What a role does on NATS besides its own events, RPCs and dead letters."""

    looks_up: tuple[str, ...] = EVENT_STREAMS  # streams it binds to at start (stream info only)
    reads: tuple[str, ...] = EVENT_STREAMS  # streams it makes consumers on, or gets messages from
    durables: tuple[tuple[str, str], ...] = ()  # (stream, durable) it owns: no other role may touch them
    publish: tuple[str, ...] = ()  # further subjects: RPCs it calls, KV/Object-Store writes, inference
    subscribe: tuple[str, ...] = ()  # core subscriptions besides its own rpc.<service>.> and inbox
    purges: tuple[str, ...] = ()  # streams it may purge: only a store it alone writes (its partial objects)


def needs_of(contract: Contract) -> Needs:
    """A service's needs, from its contract: the streams of its events and stores, the durables it names,
    its stores' writes, the RPC ops it calls and what it sends, its core subscriptions."""
    streams = (*contract.event_streams, *(store.stream for store in contract.stores))
    return Needs(
        looks_up=streams,
        reads=streams,
        durables=tuple((c.stream, c.durable) for c in contract.consumes if "{" not in c.durable),
        publish=tuple(
            dict.fromkeys(
                (
                    *(s.writes for s in contract.stores if s.writes),
                    *(op.subject for op in contract.calls),
                    *contract.sends,
                )
            )
        ),
        subscribe=tuple(dict.fromkeys(s.permission for s in contract.subscriptions)),
        purges=tuple(store.stream for store in contract.stores if store.purges),
    )


NEEDS: dict[str, Needs] = {
    **{service: needs_of(contract) for service, contract in contracts().items()},
    CLIENT: Needs(
        looks_up=(subjects.EVENTS_STREAM, RESULTS_STREAM),
        reads=(subjects.EVENTS_STREAM, RESULTS_STREAM),
        publish=(subjects.RPC_ALL, *PLAIN_REQUESTS, subjects.INFERENCE_JOBS_ALL, subjects.CANCEL),
        subscribe=(subjects.EVENTS_ALL, subjects.LIVE_ALL),
    ),
    # A user's program: requests, embeddings and jobs, and the results of jobs (RESULTS), replies on its own inbox
    # prefix. No event, RPC, cancel or stream change: the CLI's `client` reach, less all but inference.
    # RESULTS is not fenced per request id: an app program can read every job's result (operations.md).
    APP: Needs(
        looks_up=(RESULTS_STREAM,), reads=(RESULTS_STREAM,), publish=(*PLAIN_REQUESTS, subjects.INFERENCE_JOBS_ALL)
    ),
    # `strata key`: the one writer of API key records.
    OPERATOR: Needs(
        looks_up=(kv_stream(API_KEYS_BUCKET),),
        reads=(kv_stream(API_KEYS_BUCKET),),
        publish=(subjects.kv_writes(API_KEYS_BUCKET),),
    ),
    # `strata up`'s bootstrap credential: creates, updates and deletes streams, buckets and object stores.
    ADMIN: Needs(looks_up=(), reads=(), publish=("$JS.API.>",)),
}
ROLES = (*SERVICES, CLIENT, APP, OPERATOR, ADMIN)
SERVICE_ROLES = tuple(SERVICES)


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()


def own_event_subjects(role: str) -> list[str]:
    """The subjects of the events whose publisher is ``role`` (the ownership table)."""
    return sorted(cls.subject() for cls in EventData.registry.values() if cls.PUBLISHER == role)


def inbox_prefix(role: str | None) -> str:
    """Where a role's replies arrive: ``_INBOX.<role>``; a role subscribes to its own prefix only, so
    no other credential can read a completion on its way back to the gateway."""
    return f"{INBOX}.{role}" if role in ROLES else INBOX


def inbox_prefix_of_url(nats_url: str) -> str:
    """The inbox prefix for the user a (comma-separated) NATS URL names, if any."""
    return inbox_prefix(urlsplit(nats_url.split(",")[0].strip()).username)


def jetstream_api(needs: Needs) -> list[str]:
    """The JetStream API subjects a role may send: stream info for what it looks up, consumers and
    message reads on what it reads, purges of the stores it alone writes. No stream or bucket is created,
    changed or deleted here."""
    api = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    api += [f"$JS.API.STREAM.INFO.{stream}" for stream in dict.fromkeys((*needs.looks_up, *needs.reads))]
    for stream in needs.reads:
        api += [
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    api += [f"$JS.API.STREAM.PURGE.{stream}" for stream in needs.purges]
    return api


def others_durables(role: str) -> list[str]:
    """What a role may not do to the durables other roles own on the streams it reads: create or
    update, delete, pull from or acknowledge them (reading their info stays allowed)."""
    reads = set(NEEDS[role].reads)
    denied: list[str] = []
    for owner, needs in NEEDS.items():
        for stream, durable in needs.durables:
            if owner == role or stream not in reads:
                continue
            denied += [
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
            ]
    return denied


def permissions(role: str) -> Permissions:
    if role not in NEEDS:
        raise ValueError(f"unknown NATS role {role!r}; choose from {', '.join(ROLES)}")
    needs = NEEDS[role]
    publish = [*own_event_subjects(role), *needs.publish, *jetstream_api(needs), f"{INBOX}.>"]
    subscribe = [*needs.subscribe]
    subscribe_deny: list[str] = []
    if role == CLIENT:
        # Programs that use the client credential may keep nats-py's default inbox; the other roles'
        # inboxes stay closed to them.
        subscribe.append(f"{INBOX}.>")
        subscribe_deny = [f"{inbox_prefix(r)}.>" for r in ROLES if r != CLIENT]
    else:
        subscribe.append(f"{inbox_prefix(role)}.>")
    if role in SERVICE_ROLES:
        publish.append(subjects.dead_letter(role))
        subscribe.append(subjects.rpc_all(role))
    return Permissions(
        tuple(dict.fromkeys(publish)),
        tuple(dict.fromkeys(subscribe)),
        tuple(dict.fromkeys(others_durables(role))),
        tuple(subscribe_deny),
    )


def may_administer(role: str) -> bool:
    """Whether ``role`` may create, update, purge or delete streams, KV buckets and object stores."""
    return "$JS.API.>" in permissions(role).publish


def may_purge(role: str, stream: str) -> bool:
    """Whether ``role`` may purge ``stream`` (``admin`` any; a role the stores it alone writes)."""
    return may_administer(role) or f"$JS.API.STREAM.PURGE.{stream}" in permissions(role).publish


def may_write_api_keys(role: str) -> bool:
    return subjects.kv_writes(API_KEYS_BUCKET) in permissions(role).publish


# -- credentials on disk -----------------------------------------------------------------------
def auth_dir(data_dir: Path) -> Path:
    return data_dir / "nats" / "auth"


def config_path(data_dir: Path) -> Path:
    return auth_dir(data_dir) / "nats-server.conf"


@dataclass(frozen=True)
class Credential:
    user: str
    password: str

    def url(self, nats_url: str) -> str:
        return with_credentials(nats_url, self.user, self.password)

    def env(self) -> dict[str, str]:
        return {USER_ENV: self.user, PASSWORD_ENV: self.password}


def write_private(path: Path, text: str) -> None:
    """Written with mode 0600 from the first byte (no window where another user could read it)."""
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def credentials(data_dir: Path, *, rotate: bool = False) -> dict[str, Credential]:
    """Every role's credential: read from the data dir, made where missing (or all anew with ``rotate``)."""
    folder = auth_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    found: dict[str, Credential] = {}
    for role in ROLES:
        path = folder / f"{role}.json"
        if path.exists() and not rotate:
            found[role] = Credential(**json.loads(path.read_text()))
            continue
        found[role] = Credential(user=role, password=secrets.token_urlsafe(32))
        write_private(path, json.dumps({"user": role, "password": found[role].password}) + "\n")
    return found


def _quoted(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def server_config(creds: dict[str, Credential], *, anonymous_client: bool = True) -> str:
    """The ``authorization`` block for nats-server; ``anonymous_client`` maps connections that give no
    credentials to the ``client`` role (the CLI on this machine keeps working without a password)."""
    users = []
    for role, cred in creds.items():
        perms = permissions(role)
        users.append(
            f"    {{ user: {json.dumps(cred.user)}, password: {json.dumps(cred.password)}, permissions: {{\n"
            f"        publish: {{ allow: {_quoted(perms.publish)}, deny: {_quoted(perms.publish_deny)} }},\n"
            f"        subscribe: {{ allow: {_quoted(perms.subscribe)}, deny: {_quoted(perms.subscribe_deny)} }} }} }}"
        )
    lines = ["authorization {", "  users = [", ",\n".join(users), "  ]", "}"]
    if anonymous_client:
        lines.append(f"no_auth_user: {json.dumps(creds[CLIENT].user)}")
    return "\n".join(lines) + "\n"


def write(data_dir: Path, *, rotate: bool = False, anonymous_client: bool = True, extra: str = "") -> Path:
    """Make (or keep) every credential and write the nats-server config; returns the config's path.
    ``extra`` is more config text (listen address, JetStream) placed before the authorization block."""
    creds = credentials(data_dir, rotate=rotate)
    path = config_path(data_dir)
    write_private(path, extra + server_config(creds, anonymous_client=anonymous_client))
    return path


# -- the client side -------------------------------------------------------------------------
def with_credentials(nats_url: str, user: str, password: str) -> str:
    """Each server in a comma-separated URL list with ``user:password@``, unless it names its own."""
    urls = []
    for url in nats_url.split(","):
        parts = urlsplit(url.strip())
        if parts.username is None:
            netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
            parts = parts._replace(netloc=netloc)
        urls.append(urlunsplit(parts))
    return ",".join(urls)


def without_credentials(nats_url: str) -> str:
    """Each server of a URL list without its ``user:password@`` (for files that hold no secret)."""
    return ",".join(
        urlunsplit(urlsplit(u.strip())._replace(netloc=urlsplit(u.strip()).netloc.rpartition("@")[2]))
        for u in nats_url.split(",")
    )


def with_env_credentials(nats_url: str, environ: dict[str, str] | None = None) -> str:
    """``nats_url`` with the credential from ``STRATA_NATS_USER``/``STRATA_NATS_PASSWORD`` when set."""
    env = os.environ if environ is None else environ
    user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
    return with_credentials(nats_url, user, password) if user and password else nats_url


# -- the table in docs/operations.md ------------------------------------------------------------
def permissions_table() -> str:
    """Each role's NATS permissions as a Markdown table (`strata permissions`; docs/operations.md holds
    this exact text, checked by a test)."""

    def cell(items: list[str]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "—"

    rows = []
    for role in ROLES:
        perms, needs = permissions(role), NEEDS[role]
        events = [s for s in perms.publish if subjects.is_event(s)]
        other = [s for s in perms.publish if not subjects.is_event(s) and not s.startswith(("$JS.", f"{INBOX}."))]
        stream_admin = (
            "**create, update, delete every stream and bucket**"
            if may_administer(role)
            else f"purge {cell(list(needs.purges))}"
            if needs.purges
            else "none"
        )
        consumers = cell(list(needs.reads)) if needs.reads else "—"
        own = cell([f"{stream}/{durable}" for stream, durable in needs.durables])
        rows.append(
            f"| {role} | {cell(events)} | {cell(other)} | {cell(list(perms.subscribe))} | {stream_admin} "
            f"| {cell(list(needs.looks_up))} | {consumers} | {own} |"
        )
    return (
        "\n".join(
            [
                "| role | events it publishes | other subjects it publishes | it subscribes | stream administration "
                "| streams it looks up | streams it consumes or reads | durables only it may touch |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )
