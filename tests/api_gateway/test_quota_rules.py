"""The quota rules (domain/quotas.py) and their settlement (service_layer/metering.py) without NATS:
in-memory counters and a hand-moved clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.api_gateway.adapters.quota_counters import Change, InMemoryQuotaCounters, QuotaStoreUnavailable
from services.api_gateway.domain import quotas
from services.api_gateway.domain.quotas import Bucket, KeyUsage, QuotaExceeded, whole_seconds
from services.api_gateway.service_layer.metering import Metering, ran_nothing
from shared import errors
from shared.apikeys import record_for
from shared.inference import ChatMessage, InferenceRequest, SamplingOptions


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def completion(prompt: str = "p", max_tokens: int | None = 40, request_id: str = "r1") -> InferenceRequest:
    return InferenceRequest(
        request_id=request_id, model="tiny", prompt=prompt, sampling=SamplingOptions(max_tokens=max_tokens)
    )


def tokens_left(counters: InMemoryQuotaCounters, key_id: str) -> float:
    bucket = counters.values[key_id].tokens
    assert bucket is not None
    return bucket.level


def test_buckets_refill_up_to_a_minute_and_say_when():
    bucket = Bucket(per_minute=60, level=0, at=1000)  # one a second
    assert bucket.wait_for(1) == pytest.approx(1.0)
    assert bucket.at_time(1000.5, 60).wait_for(1) == pytest.approx(0.5)
    assert bucket.at_time(5000, 60).level == 60, "never more than a minute's worth"
    assert bucket.at_time(999, 60).level == 0, "a replica whose clock is behind refills nothing"
    assert bucket.at_time(1010, 30).level == 5, "a lowered limit refills at its own rate"
    assert bucket.adjusted(-100).wait_for(500) == pytest.approx(160), (
        "more than a minute's worth waits for a full bucket"
    )
    assert bucket.adjusted(1000).level == 60
    assert [whole_seconds(s) for s in (0.0, 0.2, 1.0, 1.01, 29.5)] == [1, 1, 1, 2, 30]


def test_admission_reserves_or_refuses_taking_nothing():
    clock = Clock()
    key = record_for("k", "ci", requests_per_minute=2, tokens_per_minute=100)
    usage = quotas.admit(None, key, 60, clock.now)
    assert usage.tokens is not None and usage.tokens.level == 40
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit(usage, key, 60, clock.now)
    assert caught.value.http_status == 429 and caught.value.retry_after_s == 12  # 20 tokens at 100 a minute
    assert "tokens_per_minute quota of 100" in caught.value.message and "reserves 60" in caught.value.message
    usage = quotas.admit(usage, key, 0, clock.now)  # no tokens (a model list): counts one request only
    assert usage.tokens is not None and usage.tokens.level == 40
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit(usage, key, 0, clock.now)
    assert "requests_per_minute quota of 2" in caught.value.message and caught.value.retry_after_s == 30
    unlimited = record_for("u", "free")
    assert not quotas.is_metered(unlimited) and quotas.admit(None, unlimited, 10**9, clock.now) == KeyUsage()


def test_a_request_larger_than_the_quota_runs_alone_on_a_full_bucket_and_leaves_debt():
    clock = Clock()
    key = record_for("k", "ci", tokens_per_minute=100)
    usage = quotas.admit(None, key, 250, clock.now)
    assert usage.tokens is not None and usage.tokens.level == -150
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit(usage, key, 1, clock.now)
    assert caught.value.retry_after_s == 91  # 151 tokens at 100 a minute
    usage = quotas.settle(usage, key, 200, clock.now)  # it used 50 of its 250
    assert usage.tokens is not None and usage.tokens.level == 50
    usage = quotas.settle(usage, key, -30, clock.now)  # a request that used 30 more than it reserved
    assert usage.tokens is not None and usage.tokens.level == 20


def test_the_prompt_bound_counts_bytes_and_frames_and_a_missing_max_tokens_gets_the_cap():
    assert quotas.prompt_token_bound(completion("héllo")) == 6 + quotas.PROMPT_FRAME_TOKENS
    chat = InferenceRequest(
        model="tiny", messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    )
    assert quotas.prompt_token_bound(chat) == quotas.PROMPT_FRAME_TOKENS + (8 + 6 + 8) + (2 + 4 + 8)
    bounded, reserved = quotas.bounded(chat, 4096)
    assert bounded.sampling.max_tokens == 4096 and reserved == quotas.prompt_token_bound(chat) + 4096
    assert quotas.bounded(completion(max_tokens=7), 4096) == (
        completion(max_tokens=7),
        1 + quotas.PROMPT_FRAME_TOKENS + 7,
    )
    three = completion(max_tokens=7).model_copy(update={"sampling": SamplingOptions(max_tokens=7, n=3)})
    assert (
        quotas.bounded(three, 4096)[1] == 1 + quotas.PROMPT_FRAME_TOKENS + 3 * 7
    )  # n choices reserve n times max_tokens


async def test_concurrent_reservations_cannot_overspend_and_settling_refunds():
    clock, counters = Clock(), InMemoryQuotaCounters()
    metering = Metering(max_tokens_cap=4096, clock=clock)
    metering.counters = counters
    key = record_for("k", "ci", tokens_per_minute=100)
    each = quotas.bounded(completion(), 4096)[1]  # 49

    async def one(i: int) -> object:
        try:
            return (await metering.reserve(key, completion(request_id=f"r{i}")))[1]
        except QuotaExceeded:
            return None

    holds = [h for h in await asyncio.gather(*(one(i) for i in range(30))) if h is not None]
    assert len(holds) == 100 // each and metering.open_holds == len(holds)
    await metering.settle(holds[0], 9)
    await metering.settle(holds[0], 9)  # once only
    assert tokens_left(counters, key.id) == 100 - 2 * each + (each - 9)
    await metering.settle(holds[1], 0)
    assert tokens_left(counters, key.id) == 100 - 9 and metering.open_holds == 0


async def test_a_request_without_max_tokens_is_capped_and_unmetered_keys_are_left_alone():
    metering = Metering(max_tokens_cap=64, clock=Clock())
    metering.counters = InMemoryQuotaCounters()
    capped, hold = await metering.reserve(record_for("k", "ci", tokens_per_minute=1000), completion(max_tokens=None))
    assert (
        capped.sampling.max_tokens == 64 and hold is not None and hold.reserved == 1 + quotas.PROMPT_FRAME_TOKENS + 64
    )
    request = completion(max_tokens=None)
    assert await metering.reserve(record_for("u", "free"), request) == (request, None)
    assert await metering.reserve(None, request) == (request, None)
    counted, hold = await metering.reserve(record_for("r", "rpm", requests_per_minute=5), request)
    assert counted.sampling.max_tokens is None and hold is None, "only a token quota needs a bound on the answer"


async def test_an_unknown_outcome_waits_for_the_event_then_keeps_the_charge():
    clock, counters = Clock(), InMemoryQuotaCounters()
    metering = Metering(max_tokens_cap=4096, clock=clock, settle_wait_s=0.05)
    metering.counters = counters
    key = record_for("k", "ci", tokens_per_minute=100)
    _, hold = await metering.reserve(key, completion(request_id="lost"))
    metering.settle_from_event(hold)
    await asyncio.sleep(0.1)
    await metering.settle(hold, 0)  # too late: the event never came in time
    assert tokens_left(counters, key.id) == 100 - 49 and metering.open_holds == 0


class Unreachable:
    async def change(self, key_id: str, fn: Change) -> KeyUsage:
        raise QuotaStoreUnavailable("the quota counters cannot be reached")


async def test_counters_out_of_reach_refuse_a_metered_key_and_a_lost_refund_keeps_the_charge(caplog):
    metering = Metering(max_tokens_cap=4096, clock=Clock())
    key = record_for("k", "ci", tokens_per_minute=100)
    with pytest.raises(QuotaStoreUnavailable, match="starting"):
        await metering.reserve(key, completion())
    metering.counters = InMemoryQuotaCounters()
    _, hold = await metering.reserve(key, completion())
    metering.counters = Unreachable()
    with pytest.raises(QuotaStoreUnavailable) as caught:
        await metering.reserve(key, completion(request_id="r2"))
    assert caught.value.http_status == 503 and caught.value.code == "quota_store_unavailable"
    with caplog.at_level(logging.WARNING, "api-gateway"):
        await metering.settle(hold, 9)
    assert "stays charged in full" in caplog.text


def test_what_counts_as_a_request_that_ran_nothing():
    assert all(ran_nothing(e) for e in (errors.NotFound("absent"), errors.Unavailable("full"), errors.Invalid("bad")))
    assert not any(
        ran_nothing(e)
        for e in (errors.StrataError("the client disconnected"), TimeoutError(), asyncio.CancelledError())
    )
