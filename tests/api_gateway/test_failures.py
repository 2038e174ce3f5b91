"""Every failure answers in OpenAI's shape with its own status: invalid input, unknown model, missing
or bad key, overload (gateway and worker), a worker that dies, a client that leaves."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats
import openai
import pytest

from shared.apikey_store import KeyStore
from shared.apikeys import hash_key, key_id
from shared.inference import SILENCE_TIMEOUT_S
from tests.support.fake_worker import Script
from tests.support.helpers import eventually

pytestmark = pytest.mark.timeout(60)
HI = [{"role": "user", "content": "hi"}]


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


async def test_model_not_deployed_is_an_immediate_404(gateway, workers):
    await workers()  # serves "tiny" only
    client = gateway.client()
    for stream in (False, True):
        began = time.monotonic()
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="absent", messages=HI, stream=stream)
        assert time.monotonic() - began < SILENCE_TIMEOUT_S / 2, "no responders must not wait for a time-out"
        error = error_of(caught.value)
        assert error["code"] == "model_not_found" and error["param"] == "model" and "absent" in error["message"]
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"n": 17}, "n", "n must be at most 16"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"frobnicate": True}, "frobnicate", "unrecognized request argument"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "invalid value"),
    ({"model": "bad model!"}, "model", "malformed model reference"),
    ({"stream_options": {"include_usage": True}}, "", "only allowed with stream"),
    ({"top_logprobs": 2}, "", "requires logprobs"),
    ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
])
async def test_invalid_chat_parameters_are_400_naming_the_parameter(gateway, workers, body, param, words):
    worker = await workers()
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="tiny", messages=HI, extra_body=body)
    error = error_of(caught.value)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert words in error["message"], error
    assert (error["param"] or "") == param
    assert worker.requests == [], "an invalid request never reaches a worker"


async def test_invalid_completion_parameters(gateway, workers):
    await workers()
    client = gateway.client()
    for body, param, words in (
        ({"prompt": ["a", "b"]}, "prompt", "exactly one prompt"),
        ({"logprobs": 9}, "logprobs", "5"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"echo": True, "logprobs": 1}, None, "echo with logprobs is not supported"),
        ({"suffix": "x"}, "suffix", "suffix is not supported"),
        ({"best_of": 2}, "best_of", "best_of above 1 is not supported"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="tiny", prompt="p", extra_body=body)
        assert error_of(caught.value)["param"] == param
        assert words in error_of(caught.value)["message"], error_of(caught.value)
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.v1}/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_api_keys(nats_server, gateway_factory, workers):
    await workers()
    nc = await nats.connect(nats_server.url)
    store = await KeyStore.open(nc.jetstream(), create=True)
    made, _ = await store.create("ci")
    revoked, _ = await store.create("old")
    await store.revoke(key_id(revoked))
    gateway = gateway_factory(seed_keys=["sk-from-env"])

    raw = (await store.kv.get(key_id(made))).value.decode()
    assert made not in raw and hash_key(made) in raw, "only the hash is stored"
    assert await store.get(key_id("sk-from-env")) is None, "an env key is honoured by its gateway, never written"

    for key in (made, "sk-from-env"):
        chat = await gateway.client(api_key=key).chat.completions.create(model="tiny", messages=HI)
        assert chat.choices[0].message.content == "Hello, world!"
    for key, words in (("sk-wrong", "incorrect API key"), (revoked, "revoked")):
        with pytest.raises(openai.AuthenticationError) as caught:
            await gateway.client(api_key=key).models.list()
        assert words in error_of(caught.value)["message"]
        assert error_of(caught.value)["code"] == "invalid_api_key"
    async with httpx.AsyncClient() as http:
        anonymous = await http.post(f"{gateway.v1}/chat/completions", json={"model": "tiny", "messages": HI})
        invalid_and_anonymous = await http.post(f"{gateway.v1}/chat/completions", json={"n": 3})
        health = (await http.get(f"{gateway.base_url}/healthz")).json()
    assert anonymous.status_code == 401 and "missing API key" in anonymous.json()["error"]["message"]
    assert invalid_and_anonymous.status_code == 401, "auth is checked before the body"
    assert health["auth"] == "api-keys"
    await nc.close()


async def test_open_mode_without_keys_says_so(caplog, gateway, workers):
    assert any("NO API KEY IS CONFIGURED" in r.getMessage() for r in caplog.get_records("setup"))
    await workers()
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{gateway.base_url}/healthz")).json()
        chat = await http.post(f"{gateway.v1}/chat/completions", json={"model": "tiny", "messages": HI})
    assert health["auth"] == "open" and health["status"] == "ok"
    assert chat.status_code == 200


async def test_gateway_in_flight_limit_is_429_with_retry_after(gateway_factory, workers):
    await workers({"tiny": Script(delay_s=0.3)})
    gateway = gateway_factory(max_in_flight=1)
    client = gateway.client()
    first = await client.chat.completions.create(model="tiny", messages=HI, stream=True)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="tiny", messages=HI)
    assert caught.value.response.headers["retry-after"] == "1"
    assert error_of(caught.value)["type"] == "rate_limit_error"
    assert "".join([c.choices[0].delta.content or "" async for c in first if c.choices]) == "Hello, world!"
    again = await client.chat.completions.create(model="tiny", messages=HI)  # the slot came back
    assert again.choices[0].message.content == "Hello, world!"


async def test_worker_overloaded_is_503_with_retry_after(gateway, workers):
    await workers({"tiny": Script(overloaded=True)})
    client = gateway.client()
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="tiny", messages=HI, stream=stream)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert error_of(caught.value)["code"] == "overloaded"


async def test_worker_dying_mid_stream_gives_an_error_not_a_hang(gateway, workers):
    """The test gateway's silence time-out is 1 s; the scripted worker stops after two tokens."""
    await workers({"tiny": Script(die_after=2)})
    client = gateway.client()
    stream = await client.chat.completions.create(model="tiny", messages=HI, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "Hello,"
    assert "fell silent" in caught.value.message

    with pytest.raises(openai.APIStatusError) as non_stream:
        await client.chat.completions.create(model="tiny", messages=HI)
    assert non_stream.value.status_code == 502 and error_of(non_stream.value)["code"] == "worker_lost"


async def test_client_disconnect_cancels_the_generation(gateway, workers):
    """The cancel names the gateway's own id for the request, never the caller's x-request-id."""
    worker = await workers({"tiny": Script(delay_s=0.2, tokens=["t"] * 100)})
    async with httpx.AsyncClient() as http:
        async with http.stream(
            "POST",
            f"{gateway.v1}/chat/completions",
            json={
                "model": "tiny",
                "messages": HI,
                "stream": True,
            },
            headers={"x-request-id": "leaves-early"},
        ) as response:
            ours = response.headers["x-strata-request-id"]
            async for line in response.aiter_lines():
                if '"content":"t"' in line:
                    break  # one token, then hang up
    await eventually(lambda: any(c.request_id == ours for c in worker.cancels), 10, "InferenceCancel after disconnect")

    async with httpx.AsyncClient(timeout=0.5) as http:  # non-stream: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                f"{gateway.v1}/completions",
                json={"model": "tiny", "prompt": "p", "max_tokens": 50},
                headers={"x-request-id": "gives-up"},
            )
    [gave_up] = [r.request_id for r in worker.requests if r.client_request_id == "gives-up"]
    await eventually(
        lambda: any(c.request_id == gave_up for c in worker.cancels),
        10,
        "InferenceCancel after a non-stream client left",
    )
    assert not any(c.request_id in ("leaves-early", "gives-up") for c in worker.cancels)
    async with httpx.AsyncClient() as http:  # both slots came back
        for _ in range(100):
            if (await http.get(f"{gateway.base_url}/healthz")).json()["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the in-flight slots of abandoned requests were not released")


async def test_nats_gone_is_a_503_in_openai_shape(gateway, workers, nats_server):
    await workers()
    nats_server.stop()
    async with httpx.AsyncClient() as http:
        for _ in range(200):  # until the gateway has noticed
            health = await http.get(f"{gateway.base_url}/healthz")
            if health.status_code == 503:
                break
            await asyncio.sleep(0.05)
    assert health.json()["nats_connected"] is False
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                await gateway.client().chat.completions.create(model="tiny", messages=HI, stream=stream)
            assert caught.value.status_code == 503 and "NATS is not reachable" in error_of(caught.value)["message"]
            assert caught.value.response.headers["retry-after"] == "1"
    finally:
        nats_server.start()  # so that the gateway and the workers shut down cleanly
