"""How a `strata` command that talks to NATS runs: it connects, calls a service, reports an error
and prints ``--json`` the same way as every other one.

A command is ``async def command(nc, args) -> int``; ``run`` connects (as a NATS role, where the
command needs one), runs it, closes, and turns a StrataError into one line on stderr and exit 1.
Only the wording of that line is the command's own, as scripts and tests read it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from cli import connection
from shared.contracts import RpcOp
from shared.errors import StrataError

T = TypeVar("T")
Command = Callable[[Any, argparse.Namespace], Awaitable[int]]
# A command's error line, from the error and whether it came once connected (from the command, not the connecting).
ErrorLine = Callable[[StrataError, bool], str]


def add_options(
    p: argparse.ArgumentParser, *, timeout: float, waits_for: str, data_dir: bool = True
) -> argparse.ArgumentParser:
    """``--nats-url``, ``--data-dir`` (unless the command has its own) and ``--timeout``."""
    connection.add_options(p, data_dir=data_dir)
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for {waits_for}")
    return p


def run(
    args: argparse.Namespace,
    command: Command,
    *,
    error_line: ErrorLine,
    role: str | None = None,
    denied_what: str = "",
    **connect_options: Any,
) -> int:
    """Run ``command`` on a NATS connection: as ``role`` (see connection.run_as: a permission violation
    ends it at once with Forbidden), else as the data dir's client."""
    connected = False

    async def on_connection(nc: Any) -> int:
        nonlocal connected
        connected = True
        return await command(nc, args)

    try:
        if role is not None:
            return asyncio.run(connection.run_as(args.nats_url, args.data_dir, role, on_connection, denied_what))
        return asyncio.run(_connected(args, on_connection, connect_options))
    except StrataError as exc:
        print(error_line(exc, connected), file=sys.stderr)
        return 1


async def _connected(
    args: argparse.Namespace, work: Callable[[Any], Awaitable[T]], connect_options: dict[str, Any]
) -> T:
    nc = await connection.connect(args.nats_url, getattr(args, "data_dir", None), **connect_options)
    try:
        return await work(nc)
    finally:
        await nc.close()


async def call(nc: Any, op: RpcOp, *, timeout: float = 5.0, reply: Any = None, **fields: Any) -> Any:
    """One RPC op, as a service's contract declares it (shared/contracts): the request is made from
    ``fields``; returns the reply (typed as the contract says, or as ``reply``) or raises the
    StrataError the service answered."""
    from shared import rpc

    return await rpc.call(nc, op.subject, op.request(**fields), reply or op.reply, timeout=timeout)


def print_json(value: Any, *, sort_keys: bool = False) -> int:
    """``--json``: a reply model as its JSON form, anything else as it is; returns exit code 0."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    print(json.dumps(value, indent=2, sort_keys=sort_keys, default=str))
    return 0
