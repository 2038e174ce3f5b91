"""Issue #18, OpenAI's error contract and model routes, against a real stack: a real inference-worker
(the engine on a tiny random-weight Llama, context 256), the api-gateway over uvicorn, a real
nats-server, and the official openai client (sync, async, stream) and litellm."""

from __future__ import annotations

import asyncio
import os

import pytest

from shared.events import InferenceCompleted, InferenceFailed
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(180)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm, offline: its bundled cost map, no fetch
CONTEXT = 256  # the context_length tests.inference_worker's deployments book
LONG = "The quick brown fox " * 100  # well over 256 tokens
CHAT_LONG = [{"role": "user", "content": LONG}]


@pytest.fixture
async def stack(nats_server, tmp_path, ckpts):  # noqa: F811
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    async with worker.running():
        await deployed(bus, "tiny")
        with serve_gateway(nats_server.url, tmp_path / "gw", TEST_CONFIG) as gateway:
            gateway.bus = bus  # every event, for the tests that check what was (not) published
            yield gateway
    await bus.nc.close()


def assert_context_error(exc: openai.APIStatusError, completion: int | None = None) -> None:
    assert exc.status_code == 400
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    message = error["message"]
    assert message.startswith(f"This model's maximum context length is {CONTEXT} tokens. However, you requested "), (
        message
    )
    assert message.endswith("Please reduce the length of the messages or completion."), message
    if completion is not None:
        assert f" in the messages, {completion} in the completion)" in message, message


async def test_a_prompt_over_the_context_is_context_length_exceeded_sync_async_and_stream(stack):
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=CHAT_LONG, max_tokens=4)
    assert_context_error(caught.value, completion=4)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt=LONG)
    assert_context_error(caught.value, completion=16)  # /v1/completions' max_tokens defaults to 16

    sync = openai.OpenAI(base_url=stack.v1, api_key="sk-none", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.to_thread(sync.chat.completions.create, model="tiny", messages=CHAT_LONG)
    assert_context_error(caught.value, completion=1)  # no max_tokens: it needs at least one token

    # a stream is validated before its 200: create() itself raises, with the status, not an SSE error
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=CHAT_LONG, max_tokens=4, stream=True)
    assert_context_error(caught.value, completion=4)
    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.to_thread(sync.completions.create, model="tiny", prompt=LONG, stream=True)
    assert_context_error(caught.value)

    # #21: a caller's error is a refusal, not a failure: no inference.failed (it fed the error-rate alert)
    ok = await client.completions.create(model="tiny", prompt="It was", max_tokens=2)
    await stack.bus.wait(InferenceCompleted, request_id=ok.id.removeprefix("cmpl-"))
    assert stack.bus.of(InferenceFailed) == []


async def test_prompt_plus_max_tokens_over_the_context_is_refused_unless_capping_is_asked(stack):
    client = stack.client()
    short = [{"role": "user", "content": "Call me Ishmael."}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="tiny", messages=short, max_tokens=CONTEXT, stream=stream)
        assert_context_error(caught.value, completion=CONTEXT)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt="It was", max_tokens=CONTEXT, stream=True)
    assert_context_error(caught.value, completion=CONTEXT)

    capped = await client.chat.completions.create(
        model="tiny", messages=short, max_tokens=CONTEXT, temperature=0, extra_body={"cap_max_tokens": True}
    )
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens == CONTEXT
    filled = await client.chat.completions.create(
        model="tiny", messages=short, temperature=0
    )  # no max_tokens: up to the context
    assert (
        filled.usage.prompt_tokens + filled.usage.completion_tokens <= CONTEXT and filled.usage.completion_tokens >= 1
    )


async def test_litellm_raises_context_window_exceeded(stack):
    litellm = pytest.importorskip("litellm")
    for stream in (False, True):
        with pytest.raises(litellm.ContextWindowExceededError):
            response = await asyncio.to_thread(
                litellm.completion,
                model="openai/tiny",
                api_base=stack.v1,
                api_key="sk-none",
                messages=CHAT_LONG,
                max_tokens=4,
                stream=stream,
                num_retries=0,
            )
            if stream:
                for _ in response:
                    pass


async def test_models_carry_max_model_len_and_retrieve_works(stack):
    client = stack.client()
    listed = (await client.models.list()).data
    assert [(m.id, m.model_extra["max_model_len"]) for m in listed] == [("tiny", CONTEXT)]
    one = await client.models.retrieve("tiny")
    assert (
        one.id == "tiny"
        and one.object == "model"
        and one.owned_by == "strata"
        and one.model_extra["max_model_len"] == CONTEXT
    )
    sync = openai.OpenAI(base_url=stack.v1, api_key="sk-none", max_retries=0, timeout=30)
    assert (await asyncio.to_thread(sync.models.retrieve, "tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("absent")
    error = caught.value.response.json()["error"]
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "absent" in error["message"]
