"""The shared quota counters (adapters/quota_counters.py) against a real nats-server: the bucket's one
config, compare-and-set under racing writers on two connections (two gateway replicas), a refusal
that writes nothing, and a store out of reach."""

from __future__ import annotations

import asyncio

import nats
import pytest

from services.api_gateway.adapters.quota_counters import (
    QUOTA_TTL_S,
    KvQuotaCounters,
    QuotaStoreUnavailable,
    quota_bucket_config,
)
from services.api_gateway.domain import quotas
from services.api_gateway.domain.quotas import QuotaExceeded
from shared.apikeys import record_for
from shared.nats_auth import QUOTAS_BUCKET

pytestmark = pytest.mark.timeout(60)
NOW = 1_700_000_000.0


def test_the_bucket_is_defined_once_small_and_expiring():
    config = quota_bucket_config(3)
    assert (config.bucket, config.replicas, config.history, config.ttl) == (QUOTAS_BUCKET, 3, 1, QUOTA_TTL_S)
    assert config.max_value_size and config.max_value_size <= 1024


async def test_racing_replicas_lose_no_update(nats_server):
    a, b = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        with pytest.raises(QuotaStoreUnavailable, match="does not exist"):
            await KvQuotaCounters.open(a.jetstream())
        first = await KvQuotaCounters.open(a.jetstream(), create=True)
        second = await KvQuotaCounters.open(b.jetstream())
        assert (await first.kv.status()).ttl == QUOTA_TTL_S, "the gateway made the bucket from quota_bucket_config"
        key = record_for("k", "ci", tokens_per_minute=1000)
        await asyncio.gather(
            *(counters.change(key.id, lambda u: quotas.admit(u, key, 7, NOW)) for counters in [first, second] * 20)
        )
        usage, revision = await first._read(key.id)
        assert usage is not None and usage.tokens is not None and usage.tokens.level == 1000 - 40 * 7
        assert first.conflicts + second.conflicts > 0, "the writers did race"

        greedy = record_for("g", "ci", tokens_per_minute=10)
        await first.change(greedy.id, lambda u: quotas.admit(u, greedy, 10, NOW))
        _, before = await first._read(greedy.id)
        with pytest.raises(QuotaExceeded):
            await second.change(greedy.id, lambda u: quotas.admit(u, greedy, 10, NOW))
        assert (await first._read(greedy.id))[1] == before, "a refusal writes nothing"
        await second.change(greedy.id, lambda u: quotas.settle(u, greedy, 10, NOW))  # the other replica refunds
        await first.change(greedy.id, lambda u: quotas.admit(u, greedy, 10, NOW))  # not refused on a stale memory
    finally:
        await b.close()
    await a.close()
    with pytest.raises(QuotaStoreUnavailable, match="cannot be reached"):
        await first.change(key.id, lambda u: quotas.admit(u, key, 1, NOW))
