"""Create every stream, KV bucket and object store the platform uses, before any service starts.

Only the bootstrap credential (the NATS user ``admin``, shared/nats_auth.py) may create, change or
delete them: a service that could would be able to shrink EVENTS or make it store prompts. So `strata
up` runs this as ``admin`` first, and `strata provision` does the same for a NATS that `strata up` did
not start (a cluster, Kubernetes). Safe to run again: what exists is brought up to date, never lowered
in replicas, never emptied.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError

from services.hardware_inventory.adapters.state import inventory_bucket_config
from services.model_store.adapters.blobs import blob_store_config
from services.model_store.adapters.catalog_kv import catalog_bucket_config
from shared import bus, inference_jobs, nats_auth
from shared.apikey_store import api_keys_bucket_config


def quota_bucket_config(replicas: int) -> KeyValueConfig:  # the gateway's shared token quotas
    return KeyValueConfig(bucket=nats_auth.QUOTAS_BUCKET, history=1, ttl=120.0, replicas=replicas)


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create every stream and bucket where missing, and bring the event and job streams up to date."""
    await bus.declare_streams(js, [*bus.stream_configs(replicas), *inference_jobs.job_stream_configs(replicas)])
    for config in (catalog_bucket_config(replicas), inventory_bucket_config(replicas), api_keys_bucket_config(replicas),
                   quota_bucket_config(replicas)):
        try:
            await js.key_value(config.bucket)
        except BucketNotFoundError:
            await js.create_key_value(config)
    await _object_store(js, blob_store_config(replicas))


async def _object_store(js: JetStreamContext, config: ObjectStoreConfig) -> None:
    try:
        await js.object_store(config.bucket)
    except BucketNotFoundError:
        await js.create_object_store(config.bucket, config=config)
