"""#19 finding 4: the salt of a request's prompt commitment reaches its HTTP caller, and only it: a
response header on completions and streams alike (the worker makes the salt; the gateway passes it)."""

from __future__ import annotations

import httpx
import pytest

from shared.prompt_commitment import SALT_HEADER

pytestmark = pytest.mark.timeout(60)


async def test_the_worker_s_prompt_salt_comes_back_in_a_header_on_replies_and_streams(gateway, workers):
    worker = await workers()
    client = gateway.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}]
    )
    rid = raw.headers["x-request-id"]
    assert raw.headers[SALT_HEADER] == worker.salts[rid]
    async with httpx.AsyncClient() as http:
        async with http.stream(
            "POST", f"{gateway.v1}/completions", json={"model": "tiny", "prompt": "p", "stream": True}
        ) as response:
            await response.aread()
    assert response.status_code == 200
    assert response.headers[SALT_HEADER] == worker.salts[response.headers["x-request-id"]]
    assert len(set(worker.salts.values())) == 2  # one fresh salt per request
