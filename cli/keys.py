"""`strata key create|ls|revoke`: the platform's HTTP API keys, kept (as sha256 only) in the NATS KV
bucket ``strata-api-keys`` that the gateway and every admin API read.

It talks to NATS directly (cli/connection.py: --nats-url, --data-dir, the CA) as the ``operator``
user, whose credential `strata up` writes to ``<data dir>/nats/auth/operator.json``; without that
file it connects without credentials (a server started with --insecure-nats, or one without auth)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import Error as NatsError
from rich.console import Console
from rich.table import Column, Table

from cli import connection, runner
from shared import nats_auth
from shared.apikey_store import KeyStore
from shared.apikeys import SCOPES, ApiKeyRecord
from shared.errors import StrataError, Unavailable

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
SHOWN = {"id", "name", "scopes", "requests_per_minute", "tokens_per_minute", "created", "revoked", "revoked_at"}


def register(sub: argparse._SubParsersAction) -> None:
    key = sub.add_parser("key", help="HTTP API keys for the gateway and the admin APIs: create, ls, revoke")
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")

    create = _cmd(ksub, "create", "make a key and print it (the only time it is ever shown)", _create)
    create.add_argument("--name", required=True, help="who or what uses it (shown by ls)")
    create.add_argument(
        "--scope",
        choices=SCOPES,
        default="inference",
        help="inference: the gateway's /v1 API (and its own requests' receipts); read: also the ledger's "
        "records; admin: also push, deploy, alias, delete (default inference)",
    )
    create.add_argument(
        "--rpm", type=_positive, metavar="N", help="requests per minute, per gateway replica (default unlimited)"
    )
    create.add_argument(
        "--tpm", type=_positive, metavar="N", help="prompt + completion tokens per minute (default unlimited)"
    )
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")

    ls = _cmd(ksub, "ls", "list keys: id, name, scopes, quotas, created, revoked (never the keys)", _ls)
    ls.add_argument("--json", action="store_true")

    revoke = _cmd(ksub, "revoke", "revoke a key by its id (every service refuses it at once)", _revoke)
    revoke.add_argument("id", help="the key's id, as `strata key ls` shows it")


def _cmd(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    func: Callable[[argparse.Namespace, KeyStore], Awaitable[int]],
) -> argparse.ArgumentParser:
    p = connection.add_options(sub.add_parser(name, help=help))
    command = _on_store(func, create_bucket=name == "create")
    p.set_defaults(
        func=lambda args: runner.run(
            args, command, error_line=_error_line, role=nats_auth.OPERATOR, denied_what="may not manage API keys"
        )
    )
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _on_store(func: Callable[[argparse.Namespace, KeyStore], Awaitable[int]], *, create_bucket: bool) -> runner.Command:
    """``func`` on the key store; connected as the operator when its credential is there (runner.run)."""

    async def command(nc: Any, args: argparse.Namespace) -> int:
        try:
            return await func(args, await KeyStore.open(nc.jetstream(), create=create_bucket))
        except NatsError as exc:
            raise Unavailable(f"NATS failed while managing API keys ({type(exc).__name__}: {exc})") from None

    return command


def _error_line(exc: StrataError, connected: bool) -> str:
    return f"error ({exc.code}): {exc.message}"


def _shown(record: ApiKeyRecord) -> dict[str, Any]:
    return record.model_dump(mode="json", include=SHOWN)


def _quota(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


async def _create(args: argparse.Namespace, store: KeyStore) -> int:
    key, record = await store.create(args.name, [args.scope], requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    if args.json:
        return runner.print_json({"key": key, **_shown(record)})
    print(key)  # alone on stdout: KEY=$(strata key create --name ci) works
    err.print(
        f"created API key [bold]{record.id}[/bold] ({record.name}): scopes {', '.join(record.scopes)}; "
        f"{_quota(record.requests_per_minute)} requests/min, {_quota(record.tokens_per_minute)} tokens/min. "
        "This is the only time the key is shown: only its sha256 is kept.",
        highlight=False,
    )
    return 0


async def _ls(args: argparse.Namespace, store: KeyStore) -> int:
    records, unreadable = await store.list()
    if unreadable:  # one line, whatever the output format: a damaged record must not hide the good ones
        err.print(
            f"[yellow]warning[/yellow]: skipped {len(unreadable)} unreadable record(s) in the key bucket "
            f"(not API key records; they grant nothing): {', '.join(unreadable)}",
            highlight=False,
            soft_wrap=True,
        )
    if args.json:
        return runner.print_json([_shown(r) for r in records])
    table = Table(
        Column("id", no_wrap=True),
        "name",
        "scopes",
        Column("requests/min", no_wrap=True),
        Column("tokens/min", no_wrap=True),
        "created",
        "revoked",
    )
    for r in records:
        revoked = r.revoked_at.strftime("%Y-%m-%d %H:%M") if r.revoked_at else ("yes" if r.revoked else "-")
        table.add_row(
            r.id,
            r.name,
            ",".join(r.scopes),
            _quota(r.requests_per_minute),
            _quota(r.tokens_per_minute),
            r.created.strftime("%Y-%m-%d %H:%M"),
            revoked,
        )
    out.print(table if records else "no API keys: every service is open (create one with `strata key create`)")
    return 0


async def _revoke(args: argparse.Namespace, store: KeyStore) -> int:
    record = await store.revoke(args.id)
    out.print(f"revoked API key {record.id} ({record.name})", highlight=False)
    return 0
