"""Errors FastAPI raises itself (a body not even decodable as UTF-32 JSON, an unknown route) still come back as
OpenAI error objects, as the routes document; schemathesis found ``{"detail": ...}`` there
(tests/fuzz/test_http_fuzz.py)."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_json_cannot_even_decode_is_an_openai_400(gateway, path: str):
    r = httpx.post(
        f"{gateway.base_url}{path}",
        content=b"a\x00\x00\x00\xff\xff\xff\xff",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "parsing the body" in error["message"]
    assert r.headers["x-request-id"]


def test_an_unknown_route_is_an_openai_404(gateway):
    r = httpx.get(f"{gateway.base_url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_must_be_declared_json_and_not_be_empty(gateway, path: str):
    body = (
        b'{"model": "tiny", "prompt": "p"}'
        if path == "/v1/completions"
        else b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
    )
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        r = httpx.post(f"{gateway.base_url}{path}", content=body, headers=headers)
        assert r.status_code == 400, (headers, r.text)  # a cross-origin "simple" post never gets past this
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.base_url}{path}", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "no body" in r.json()["error"]["message"]
    r = httpx.post(
        f"{gateway.base_url}{path}",
        content=body,
        headers={"content-type": "application/vnd.strata+json; charset=utf-8"},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (
        r.text
    )  # parsed: no worker serves it
