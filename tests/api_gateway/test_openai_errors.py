"""Issue #18: the gateway's error contract. A body over the size limit is 413 naming the limit (not a
503 that clients retry forever), models can be retrieved one by one, and every error path answers
OpenAI's error object. Real gateway over uvicorn, real nats-server, scripted workers, openai client."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api_gateway.domain.errors import to_openai
from services.api_gateway.domain.responses import ErrorBody
from services.api_gateway.config import MAX_BODY_BYTES, NATS_HEADROOM_BYTES, GatewayConfig
from services.api_gateway.service_layer.handlers import Gateway
from shared import errors

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(60)


def openai_error(response: httpx.Response) -> dict[str, object]:
    """The body as OpenAI gives it: exactly {"error": {message, type, param, code}}, each typed."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    parsed = ErrorBody.model_validate(body).error
    assert parsed.message and parsed.type in ("invalid_request_error", "rate_limit_error", "server_error"), body
    return body["error"]


async def test_a_body_over_the_limit_is_413_naming_it_and_never_retried(gateway, workers):
    worker = await workers()
    client = gateway.client()
    huge = "x" * (1 << 20)  # 1 MiB: over the default limit, and over what one NATS message carries
    with pytest.raises(openai.APIStatusError) as caught:
        await client.completions.create(model="tiny", prompt=huge)
    response = caught.value.response
    assert response.status_code == 413 and "retry-after" not in response.headers
    error = openai_error(response)
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"at most {MAX_BODY_BYTES} bytes" in str(error["message"]), error
    # a chunked body declares no length: it is measured once read
    async def pieces():
        for piece in (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "',
            b"y" * (MAX_BODY_BYTES + 1),
            b'"}]}',
        ):
            yield piece

    async with httpx.AsyncClient() as http:
        chunked = await http.post(
            f"{gateway.v1}/chat/completions", headers={"content-type": "application/json"}, content=pieces()
        )
    assert chunked.status_code == 413 and openai_error(chunked)["code"] == "request_too_large"
    assert worker.requests == [], "nothing over the limit reached a worker"
    ok = await client.completions.create(model="tiny", prompt="x" * (MAX_BODY_BYTES - 1024))
    assert ok.choices[0].text == "Hello, world!"


async def test_the_limit_is_configurable(gateway_factory, workers):
    await workers()
    client = gateway_factory(max_body_bytes=4096).client()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "z" * 5000}])
    assert caught.value.status_code == 413 and "at most 4096 bytes" in caught.value.message


async def test_every_error_path_answers_openais_shape(gateway, workers):
    await workers()
    v1, chat = gateway.v1, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:
        cases = {
            "not json": (
                await http.post(f"{v1}/chat/completions", content=b"{", headers={"content-type": "application/json"}),
                400,
            ),
            "not declared json": (await http.post(f"{v1}/chat/completions", content=b"{}"), 400),
            "unknown field": (await http.post(f"{v1}/chat/completions", json={**chat, "bogus": 1}), 400),
            "bad value": (await http.post(f"{v1}/chat/completions", json={**chat, "temperature": 9}), 400),
            "model not deployed": (await http.post(f"{v1}/chat/completions", json={**chat, "model": "absent"}), 404),
            "retrieve unknown": (await http.get(f"{v1}/models/absent"), 404),
            "unknown route": (await http.get(f"{v1}/nothing"), 404),
            "wrong method": (await http.get(f"{v1}/chat/completions"), 405),
            "too large": (await http.post(f"{v1}/completions", json={"model": "tiny", "prompt": "x" * (1 << 20)}), 413),
        }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        openai_error(response)
    assert openai_error(cases["model not deployed"][0])["code"] == "model_not_found"
    assert openai_error(cases["retrieve unknown"][0])["code"] == "model_not_found"
    # each one counted as a refusal, by reason, at /metrics (#21: refused is not failed)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{gateway.v1.removesuffix('/v1')}/metrics")).text
    refusals = {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "strata_gateway_refusals"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert refusals == {"validation": 6, "not_found": 3}, refusals


def test_each_refusal_has_its_reason_and_a_failure_of_ours_none():
    from services.api_gateway.domain.errors import Overloaded
    from services.api_gateway.domain.quotas import QuotaExceeded

    reasons = {
        errors.Unauthorized("no key"): "auth",
        errors.Forbidden("scope"): "auth",
        QuotaExceeded("tokens", retry_after_s=3): "quota",
        Overloaded("busy"): "overload",
        errors.Unavailable("workers full"): "overload",
        errors.ContextLengthExceeded.of(256, 300, 1): "context",
        errors.NotFound("absent"): "not_found",
        errors.Invalid("bad"): "validation",
        errors.TooLarge("big"): "validation",
        errors.StrataError("bug"): None,
    }
    for exc, reason in reasons.items():
        assert to_openai(exc).refusal == reason, (exc, reason)


async def test_models_retrieve_and_list_through_the_openai_client(gateway, workers):
    await workers()
    client = gateway.client()
    one = await client.models.retrieve("tiny")
    assert (one.id, one.object, one.owned_by) == ("tiny", "model", "strata")
    assert one.model_extra.get("max_model_len") is None, "a worker that says no context: none invented"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("absent")
    assert caught.value.code == "model_not_found" and "absent" in caught.value.message


# -- the service layer alone ----------------------------------------------------------------------
class _Nats:
    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload


def _gateway(max_payload: int | None, **config: object) -> Gateway:
    def connection() -> _Nats:
        if max_payload is None:
            raise AssertionError("not connected")
        return _Nats(max_payload)

    return Gateway(GatewayConfig(**config), connection, auth=None)  # type: ignore[arg-type]


def test_body_limit_is_the_configured_one_under_what_nats_carries():
    assert _gateway(1 << 20).body_limit() == MAX_BODY_BYTES
    assert _gateway(1 << 20, max_body_bytes=4 << 20).body_limit() == (1 << 20) - NATS_HEADROOM_BYTES
    assert _gateway(8 << 20, max_body_bytes=4 << 20).body_limit() == 4 << 20
    assert _gateway(None, max_body_bytes=2048).body_limit() == 2048  # not connected: the configured one


def test_check_body_size_raises_too_large_naming_the_limit():
    gateway = _gateway(1 << 20, max_body_bytes=2048)
    gateway.check_body_size(2048)
    with pytest.raises(errors.TooLarge, match="2049 bytes; this gateway accepts at most 2048 bytes"):
        gateway.check_body_size(2049)


def test_context_length_exceeded_in_openais_words_and_shape():
    exc = errors.ContextLengthExceeded.of(4096, 4000, 200)
    assert exc.message == (
        "This model's maximum context length is 4096 tokens. However, you requested 4200 tokens "
        "(4000 in the messages, 200 in the completion). Please reduce the length of the messages or completion."
    )
    assert errors.from_code(exc.code, exc.message).__class__ is errors.ContextLengthExceeded, "it survives the NATS hop"
    error = to_openai(exc)
    assert error.status == 400 and error.retry_after_s is None
    assert error.body.error.model_dump() == {
        "message": exc.message,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    too_large = to_openai(errors.TooLarge("big"))
    assert (
        too_large.status == 413 and too_large.retry_after_s is None and too_large.body.error.code == "request_too_large"
    )


def test_the_wire_omits_the_new_sampling_fields_unless_set_so_workers_before_them_still_parse_requests():
    """SamplingOptions forbids unknown fields: a worker from before #18 would refuse every request of a new
    gateway that always sent ``cap_max_tokens``, ``n`` or the penalties. They travel only when set (the only
    values such a worker cannot honour), and a request without them means their defaults."""
    from pydantic import ConfigDict, create_model

    from services.api_gateway.domain.requests import ChatCompletionRequest
    from shared.inference import WIRE_OPTIONAL, InferenceRequest, SamplingOptions

    added = {
        "cap_max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_p",
        "n",
    }
    assert added <= set(WIRE_OPTIONAL)
    before = create_model(
        "SamplingBefore18",
        __config__=ConfigDict(extra="forbid"),
        **{name: (f.annotation, f) for name, f in SamplingOptions.model_fields.items() if name not in added},
    )
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    plain = ChatCompletionRequest.model_validate(body).to_inference("r1")
    sent = plain.model_dump(mode="json")["sampling"]
    assert not set(WIRE_OPTIONAL) & set(sent) and before.model_validate(sent).max_tokens == 3
    penalised = ChatCompletionRequest.model_validate({**body, "presence_penalty": 0.5, "n": 2}).to_inference("r3")
    assert {"presence_penalty": 0.5, "n": 2}.items() <= penalised.model_dump(mode="json")["sampling"].items()
    assert InferenceRequest.model_validate_json(plain.model_dump_json()).sampling.cap_max_tokens is False
    capped = ChatCompletionRequest.model_validate({**body, "cap_max_tokens": True}).to_inference("r2")
    assert InferenceRequest.model_validate_json(capped.model_dump_json()).sampling.cap_max_tokens is True


def test_on_demand_load_errors_are_openai_errors_that_say_whether_to_retry():
    loading = to_openai(errors.from_code("model_loading", "m:1 is still loading on n1 after 120s; retry shortly"))
    assert loading.status == 503 and loading.headers.get("Retry-After")
    assert loading.body.error.code == "model_loading" and loading.body.error.type == "server_error"
    failed = to_openai(errors.from_code("model_load_failed", "could not load m:1 on n1: bad checkpoint: ..."))
    assert failed.status == 500 and failed.retry_after_s is None
    assert failed.body.error.code == "model_load_failed" and "bad checkpoint" in failed.body.error.message
