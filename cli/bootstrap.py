"""What `strata up` does over NATS before any service starts, with the bootstrap credentials only it
holds: every stream and bucket (the services may not make them), and at the first start an admin API
key, so that no HTTP API is ever open for a moment."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared import nats_auth, replication

# A NATS connection as a role (nats_auth.ADMIN, OPERATOR, ...), with nats-py's connect options.
Connect = Callable[..., Awaitable[Any]]


async def provision_streams(connect: Connect) -> str | None:
    """Every stream and bucket (cli/provision.py); None when done, else the line that says why not."""
    from cli.provision import provision

    try:
        nc = await connect(nats_auth.ADMIN, max_reconnect_attempts=2)
        try:
            await provision(nc.jetstream(), replication.stream_replicas())
        finally:
            await nc.close()
    except Exception as exc:  # e.g. an external NATS where this machine holds no admin credential
        return (f"strata up: could not create the streams and buckets: {type(exc).__name__}: {exc} "
                "(where NATS has users, run `strata provision` with its admin credential)")
    return None


async def bootstrap_api_key(connect: Connect, data_dir: Path) -> str:
    """At the first start, an admin API key into the data dir: every HTTP API closes at once."""
    from shared.apikey_store import KeyStore, ensure_admin_key
    from shared.apikeys import key_file

    path = key_file(data_dir)
    nc = await connect(nats_auth.OPERATOR, max_reconnect_attempts=2)
    try:
        made = await ensure_admin_key(await KeyStore.open(nc.jetstream(), create=True), path)
    finally:
        await nc.close()
    if made:
        return (f"strata up: made an admin API key, in {path} (mode 0600); the strata commands here use it. "
                f"HTTP callers send  Authorization: Bearer $(cat {path})")
    return (
        "strata up: API keys in force (strata key ls)"
        f"{'; the admin key made at first start is in ' + str(path) if path.exists() else ''}"
    )
