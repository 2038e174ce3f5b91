"""Per-key quotas through the real gateway (issue #19, finding 6): tokens are reserved at admission
(prompt bound + max_tokens) and settled at the end, in counters that every gateway replica shares
(the NATS KV bucket strata-quotas), so concurrency and replicas cannot overspend a key."""

from __future__ import annotations

import asyncio

import httpx
import nats
import openai
import pytest

from shared.apikey_store import KeyStore
from shared.nats_auth import QUOTAS_BUCKET
from tests.support.fake_worker import Script

pytestmark = pytest.mark.timeout(90)
LONG = Script(tokens=["t"] * 40)
ONE_REQUEST = 5 + 40  # what the scripted worker serves for prompt "p", max_tokens 40: 5 prompt + 40 completion


async def make_key(nats_url: str, **quotas: int) -> str:
    nc = await nats.connect(nats_url)
    try:
        key, _ = await (await KeyStore.open(nc.jetstream(), create=True)).create("quota-test", **quotas)
    finally:
        await nc.close()
    return key


async def served_tokens(client: openai.AsyncOpenAI, max_tokens: int = 40, **kwargs: object) -> int:
    """The tokens one request was served, or 0 when its key's quota refused it (429 with Retry-After)."""
    try:
        reply = await client.completions.create(model="tiny", prompt="p", max_tokens=max_tokens, **kwargs)  # type: ignore[call-overload]
    except openai.RateLimitError as exc:
        assert int(exc.response.headers["retry-after"]) >= 1
        assert exc.response.json()["error"]["code"] == "rate_limit_exceeded"
        return 0
    return reply.usage.total_tokens


async def test_thirty_concurrent_requests_cannot_overspend_a_token_quota(nats_server, gateway, workers):
    """The issue's reproduction: 30 concurrent requests on a key limited to 100 tokens a minute were
    served 2,462 tokens. Reserved at admission, they get at most the quota plus one request."""
    await workers({"tiny": LONG})
    client = gateway.client(api_key=await make_key(nats_server.url, tokens_per_minute=100))
    served = await asyncio.gather(*(served_tokens(client) for _ in range(30)))
    assert 0 < sum(served) <= 100 + ONE_REQUEST, served


async def test_two_gateway_replicas_share_one_key_quota(nats_server, gateway_factory, workers):
    await workers({"tiny": LONG})
    a, b = gateway_factory(), gateway_factory()
    tokens_key = await make_key(nats_server.url, tokens_per_minute=100)
    served = await asyncio.gather(*(served_tokens(gw.client(api_key=tokens_key)) for gw in [a, b] * 15))
    assert 0 < sum(served) <= 100 + ONE_REQUEST, served

    requests_key = await make_key(nats_server.url, requests_per_minute=2)
    answered = [await served_tokens(gw.client(api_key=requests_key)) > 0 for gw in (a, b, a, b)]
    assert answered == [True, True, False, False], "two replicas must not admit twice a key's requests_per_minute"


async def test_settling_refunds_what_a_request_did_not_use(nats_server, gateway, workers):
    """Each request reserves ~900 of the key's 1000 tokens a minute but uses 9 (5 prompt + 4): only
    the refund at its end lets the next one in, whether it ended with a reply, a stream's end, a 404
    (nothing ran) or the client hanging up mid-stream (settled from the worker's inference.completed)."""
    await workers({"tiny": Script(), "slow": Script(delay_s=0.1, tokens=["t"] * 100)})
    client = gateway.client(api_key=await make_key(nats_server.url, tokens_per_minute=1000))
    for stream in (False, True, False, True):
        if stream:
            chunks = [
                c async for c in await client.completions.create(model="tiny", prompt="p", max_tokens=900, stream=True)
            ]
            assert "".join(c.choices[0].text for c in chunks) == "Hello, world!"
        else:
            assert (await client.completions.create(model="tiny", prompt="p", max_tokens=900)).usage.total_tokens == 9
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="absent", prompt="p", max_tokens=900)
    assert await served_tokens(client, max_tokens=900) == 9, "a 404 gives its whole reservation back"

    async with client.completions.with_streaming_response.create(
        model="slow", prompt="p", max_tokens=900, stream=True
    ) as response:
        async for line in response.iter_lines():
            if '"text":"t"' in line:
                break  # one token, then hang up
    for _ in range(100):  # the refund lands when the worker's inference.completed does
        if await served_tokens(client, max_tokens=900):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the reservation of a request whose client hung up was never settled")


async def test_a_quota_store_out_of_reach_fails_closed_with_503(nats_server, gateway, workers):
    """Without the shared counters a limited key cannot be held to its quota: 503, nothing served. An
    unlimited key needs no counters and is still served."""
    worker = await workers()
    limited = await make_key(nats_server.url, tokens_per_minute=1000)
    unlimited = await make_key(nats_server.url)
    assert await served_tokens(gateway.client(api_key=limited)) == 9
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(f"KV_{QUOTAS_BUCKET}")
    await nc.close()
    async with httpx.AsyncClient() as http:
        refused = await http.post(
            f"{gateway.v1}/completions",
            json={"model": "tiny", "prompt": "p"},
            headers={"Authorization": f"Bearer {limited}"},
        )
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["error"]["code"] == "quota_store_unavailable"
    assert "quota" in refused.json()["error"]["message"]
    assert len(worker.requests) == 1, "a request that cannot be metered never reaches a worker"
    assert await served_tokens(gateway.client(api_key=unlimited)) == 9
