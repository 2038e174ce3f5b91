"""How every `strata` command reaches NATS: the ``--nats-url``/``--data-dir`` options, the credential and
the CA it connects with, and one clear error when it cannot.

The credential, first found: the URL's own ``user:password@``; ``STRATA_NATS_USER``/``STRATA_NATS_PASSWORD``;
the one `strata up` wrote into the data dir (``<data_dir>/nats/auth/client.json``), so the CLI on the
machine that runs `strata up` needs no password typed. The CA: ``STRATA_NATS_CA``, else the data dir's
generated ``nats/tls/ca.pem`` where it exists (shared/nats_tls.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from shared import endpoints, errors, nats_auth, nats_tls
from shared.config import DATA_DIR_ENV, DEFAULT_DATA_DIR, DEFAULT_NATS_URL
from shared.config import data_dir_from_env as default_data_dir

T = TypeVar("T")


def add_options(p: argparse.ArgumentParser, *, data_dir: bool = True) -> argparse.ArgumentParser:
    """``--nats-url`` and (unless the command has its own) ``--data-dir``."""
    p.add_argument("--nats-url", default=None,
                   help="NATS to connect to (nats://user:password@host:4222 passes a credential); default "
                        f"$STRATA_NATS_URL, else the one the `strata up` of the data dir runs, else {DEFAULT_NATS_URL}")
    if data_dir:
        p.add_argument("--data-dir", type=Path, default=None,
                       help=f"the data dir of the `strata up` on this machine, for its NATS credential and CA "
                            f"(default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})")
    return p


def resolve_nats_url(nats_url: str | None, data_dir: Path | None = None) -> str:
    """``--nats-url``, else ``$STRATA_NATS_URL``, else the NATS of the `strata up` on the data dir
    (its endpoints.json), else the default address, said on stderr."""
    if nats_url:
        return nats_url
    if os.environ.get("STRATA_NATS_URL"):
        return os.environ["STRATA_NATS_URL"]
    return endpoints.nats(DEFAULT_NATS_URL, data_dir)


def authenticated_url(nats_url: str, data_dir: Path | None = None, *, role: str = nats_auth.CLIENT,
                      environ: dict[str, str] | None = None) -> str:
    """``nats_url`` with a credential in each server that names none (see the module for the order)."""
    env = os.environ if environ is None else environ
    if env.get(nats_auth.USER_ENV) and env.get(nats_auth.PASSWORD_ENV):
        return nats_auth.with_env_credentials(nats_url, env)
    path = nats_auth.auth_dir(data_dir or default_data_dir(env)) / f"{role}.json"
    try:
        credential = nats_auth.Credential(**json.loads(path.read_text()))
    except FileNotFoundError:
        return nats_url  # a NATS without auth, or one whose credential this user was not given
    except (OSError, ValueError, TypeError) as exc:
        raise errors.Unavailable(f"cannot read the NATS credential {path}: {exc}") from None
    return credential.url(nats_url)


def trusted_ca(data_dir: Path | None = None, environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    if env.get(nats_tls.CA_ENV):
        return Path(env[nats_tls.CA_ENV])
    generated = nats_tls.tls_dir(data_dir or default_data_dir(env)) / "ca.pem"
    return generated if generated.is_file() else None


async def connect(nats_url: str | None, data_dir: Path | None = None, *, role: str = nats_auth.CLIENT,
                  error_cb: Callable[[Exception], Awaitable[None]] | None = None, **options: Any) -> Any:
    """A connected nats-py client, or a StrataError that says why not: Unavailable (no server, TLS not
    trusted) or Unauthorized (the server refused the credential, or the lack of one). ``nats_url``
    None: see ``resolve_nats_url``."""
    import nats
    from nats import errors as nats_errors

    nats_url = resolve_nats_url(nats_url, data_dir)
    try:
        tls = nats_tls.client_context(trusted_ca(data_dir))
    except nats_tls.TlsSetupError as exc:
        raise errors.Unavailable(str(exc)) from None
    seen: list[Exception] = []
    refused = asyncio.Event()

    async def record(exc: Exception) -> None:  # nats-py reports each failed attempt here, not in the raise
        seen.append(exc)
        if _refusal(exc):
            refused.set()
        if error_cb is not None:
            await error_cb(exc)

    options.setdefault("connect_timeout", 5)
    if options.get("allow_reconnect") is False:  # nats-py retries a refused first connect regardless: give up soon
        options.setdefault("max_reconnect_attempts", 1)
        options.setdefault("reconnect_time_wait", 0.1)
    nc = nats.NATS()
    url = authenticated_url(nats_url, data_dir, role=role)
    options.setdefault("inbox_prefix", nats_auth.inbox_prefix_of_url(url))  # a service's user reads only its own
    connecting = asyncio.ensure_future(nc.connect(url, tls=tls, error_cb=record, **options))
    # A refusal is final, and nats-py, allowed to reconnect, can hang after a failed TLS handshake: stop at the first.
    stop = asyncio.ensure_future(refused.wait())
    await asyncio.wait({connecting, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise _why(nats_url, seen[-1])
    try:
        connecting.result()
    except (nats_errors.Error, OSError, TimeoutError) as exc:  # NoServersError: the last attempt's error says why
        raise _why(nats_url, seen[-1] if isinstance(exc, nats_errors.NoServersError) and seen else exc) from None
    return nc


async def run_as(
    nats_url: str | None, data_dir: Path | None, role: str, work: Callable[[Any], Awaitable[T]], denied_what: str
) -> T:
    """Connect as ``role`` (its credential from the data dir where there) and run ``work(nc)``. A
    permission violation (the server's asynchronous -ERR) ends the work at once with Forbidden, instead
    of the time-out that the refused request would otherwise turn into."""
    denied: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower() and not denied.done():
            denied.set_result(str(exc))

    # max_reconnect_attempts=1: nats-py retries even a first connect that many times (0 means forever)
    nc = await connect(
        nats_url, data_dir, role=role, error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=1
    )
    try:
        task = asyncio.ensure_future(work(nc))
        await asyncio.wait({task, denied}, return_when=asyncio.FIRST_COMPLETED)
        if denied.done() and not task.done():
            task.cancel()
            credential = nats_auth.auth_dir(data_dir or default_data_dir()) / f"{role}.json"
            hint = (
                ""
                if credential.exists()
                else f" (there is no {role} credential at {credential}: pass --data-dir of the `strata up`)"
            )
            raise errors.Forbidden(f"permission denied: this NATS user {denied_what}{hint}: {denied.result()}")
        return task.result()
    finally:
        denied.cancel()
        await nc.close()


def _refusal(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) or "authorization violation" in str(exc).lower()


def redacted(url: str) -> str:
    """The URL without a password in it (nats://user:secret@host -> nats://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _why(nats_url: str, exc: BaseException) -> errors.StrataError:
    where = f"NATS at {redacted(nats_url)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return errors.Unavailable(
            f"cannot reach {where}: its TLS certificate is not trusted ({exc.verify_message}); set "
            f"{nats_tls.CA_ENV} to the CA that signed it, or --data-dir to the data dir of the `strata up` that made it"
        )
    if _refusal(exc):
        return errors.Unauthorized(
            f"{where} refused the connection (authorization violation): "
            "give a credential as nats://USER:PASSWORD@HOST, "
            f"or {nats_auth.USER_ENV}/{nats_auth.PASSWORD_ENV}, or --data-dir of the `strata up` that runs it"
        )
    return errors.Unavailable(f"cannot reach {where}: {exc or type(exc).__name__}")
