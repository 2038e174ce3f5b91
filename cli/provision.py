"""Create every stream, KV bucket and object store the platform uses, before any service starts.

Only the bootstrap credential (the NATS user ``admin``, shared/nats_auth.py) may create, change or
delete them: a service that could would be able to shrink EVENTS or make it store prompts. So `strata
up` runs this as ``admin`` first, and `strata provision` does the same for a NATS that `strata up` did
not start (a cluster, Kubernetes). Safe to run again: what exists is brought up to date, never lowered
in replicas, never emptied.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig
from nats.js.errors import BucketNotFoundError

from cli import connection, runner
from shared import bus, errors, inference_jobs, nats_auth, replication
from shared.apikey_store import api_keys_bucket_config
from shared.blob_store import blob_store_config


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create every stream and bucket where missing, and bring the event and job streams up to date."""
    from services.api_gateway.api import quota_bucket_config  # here: each api module loads its service's code
    from services.hardware_inventory.api import inventory_bucket_config
    from services.model_store.api import catalog_bucket_config

    await bus.declare_streams(js, [*bus.stream_configs(replicas), *inference_jobs.job_stream_configs(replicas)])
    for config in (catalog_bucket_config(replicas), inventory_bucket_config(replicas), api_keys_bucket_config(replicas),
                   quota_bucket_config(replicas)):
        try:
            await js.key_value(config.bucket)
        except BucketNotFoundError:
            await js.create_key_value(config)
    await _object_store(js, blob_store_config(replicas))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = connection.add_options(sub.add_parser(
        "provision", help="create every stream and bucket, as the NATS admin credential (strata up does this itself)"))
    p.add_argument(
        "--replicas", type=int, default=None, help="copies of each stream (default $STRATA_STREAM_REPLICAS or 1)"
    )
    p.set_defaults(func=_provision)
    perms = sub.add_parser("permissions", help="print each NATS role's permissions (the table in docs/operations.md)")
    perms.set_defaults(func=lambda args: print(nats_auth.permissions_table(), end=""))


def _provision(args: argparse.Namespace) -> int:
    try:
        replicas = args.replicas or replication.stream_replicas()
    except ValueError as exc:
        print(f"strata provision: {exc}", file=sys.stderr)
        return 1

    async def command(nc: Any, args: argparse.Namespace) -> int:
        try:
            await provision(nc.jetstream(timeout=10), replicas)
        except NatsError as exc:
            raise errors.Unavailable(str(exc)) from None
        print(
            f"provisioned {len(nats_auth.ALL_STREAMS)} streams and buckets ({replicas} replica(s)): "
            f"{', '.join(nats_auth.ALL_STREAMS)}"
        )
        return 0

    return runner.run(
        args,
        command,
        error_line=lambda exc, connected: f"strata provision: {exc.message}",
        role=nats_auth.ADMIN,
        denied_what="may not create streams (use the admin credential)",
    )


async def _object_store(js: JetStreamContext, config: ObjectStoreConfig) -> None:
    try:
        await js.object_store(config.bucket)
    except BucketNotFoundError:
        await js.create_object_store(config.bucket, config=config)
