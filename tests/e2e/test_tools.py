"""Tools end to end: the openai client and langchain-openai → the gateway → NATS → a real worker whose
random-weight checkpoints carry tool-capable chat templates (tests/tools/templates: Hermes, Llama 3.1
JSON, Mistral). Forced calls (tool_choice required or named) must name an allowed function with
arguments valid for its schema; streamed calls arrive as OpenAI's deltas and add up to the whole answer;
earlier calls and tool results render through the template; a model whose template has no tools says so."""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from services.inference_worker.service_layer.worker import Worker
from tests.api_gateway.conftest import TEST_CONFIG, serve_gateway
from tests.engine.conftest import _one_torch_thread, build_checkpoint, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts, connect_bus, deployed, make_worker  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(240)
TEMPLATES = Path(__file__).resolve().parents[1] / "tools" / "templates"
FORMATS = {"hermes": "hermes.jinja", "llama3": "llama3_json.jinja", "mistral": "mistral.jinja"}

WEATHER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "days"],
    "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
}
SEARCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["query"],
    "properties": {"query": {"type": "string", "maxLength": 10}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "the web", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def tool_ckpts(ckpts, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A tiny random-weight Llama with room for tool prompts under each tool-capable template (and the
    worker tests' "tiny", whose template has no tools)."""
    root = tmp_path_factory.mktemp("tool-ckpts")
    base = build_checkpoint(root / "base", tokenizer_dir, arch="llama", seed=7, max_position_embeddings=2048).path
    out = dict(ckpts)
    for name, template in FORMATS.items():
        shutil.copytree(base, root / name)
        config = root / name / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data["chat_template"] = (TEMPLATES / template).read_text()
        config.write_text(json.dumps(data))
        out[name] = root / name
    return out


@asynccontextmanager
async def stack(nats_server, tmp_path, ckpts, *models):
    bus = await connect_bus(nats_server.url, "node-a")
    worker = make_worker(nats_server.url, tmp_path / "worker", ckpts)
    stack.bus, stack.worker = bus, worker  # type: ignore[attr-defined]
    try:
        async with worker.running():
            for model in models:
                await deployed(bus, model, context_length=2048, kv_cache_bytes=32 << 20)
            # long tool prompts on a busy 2-core machine: the default silence limit, not the tests' 1 s
            with serve_gateway(
                nats_server.url, tmp_path / "gw", TEST_CONFIG.model_copy(update={"silence_timeout_s": 10.0})
            ) as gateway:
                yield gateway
    finally:
        await bus.nc.close()


def check_calls(calls, allowed=("get_weather", "search")) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def streamed_calls(stream) -> tuple[str, dict[int, list[str]], str | None]:
    """Content, and per call index [id, name, arguments] put together from the deltas, and the finish_reason."""
    content, calls, finish = "", {}, None
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.function.arguments == ""  # a call opens once, with its name
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.function.name is None
            calls[d.index][2] += d.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("model", list(FORMATS))
async def test_forced_calls_are_valid_in_every_format(nats_server, tmp_path, tool_ckpts, model):
    async with stack(nats_server, tmp_path, tool_ckpts, model) as gateway:
        client = gateway.client()
        answers = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=model,
                    messages=ASK,
                    tools=TOOLS,
                    tool_choice="required",
                    seed=seed,
                    temperature=1.0,
                    max_tokens=300,
                )
                for seed in range(8)
            ]
        )
        for a in answers:
            assert a.choices[0].finish_reason == "tool_calls", a.choices[0]
            check_calls(a.choices[0].message.tool_calls)

        named = await client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            max_tokens=300,
            temperature=1.0,
            seed=3,
            parallel_tool_calls=False,
            tool_choice={"type": "function", "function": {"name": "search"}},
        )
        assert len(named.choices[0].message.tool_calls) == 1
        check_calls(named.choices[0].message.tool_calls, allowed=("search",))

        whole = await client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice="required", seed=11, temperature=1.0, max_tokens=300
        )
        stream = await client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            seed=11,
            temperature=1.0,
            max_tokens=300,
            stream=True,
        )
        content, calls, finish = await streamed_calls(stream)
        assert finish == "tool_calls"
        assert [(n, a) for _, n, a in (calls[i] for i in sorted(calls))] == [
            (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
        ]


async def test_a_conversation_with_calls_and_results_round_trips(nats_server, tmp_path, tool_ckpts):
    async with stack(nats_server, tmp_path, tool_ckpts, "hermes") as gateway:
        client = gateway.client()
        first = await client.chat.completions.create(
            model="hermes", messages=ASK, tools=TOOLS, tool_choice="required", seed=1, temperature=1.0, max_tokens=300
        )
        message = first.choices[0].message
        results = [{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in message.tool_calls]
        history = ASK + [message.model_dump(exclude_none=True)] + results
        for choice in ("auto", "none"):
            after = await client.chat.completions.create(
                model="hermes", messages=history, tools=TOOLS, tool_choice=choice, seed=2, max_tokens=40
            )
            reply = after.choices[0]
            if reply.message.tool_calls:  # the model may call again; whatever it does must be well formed
                assert choice == "auto" and reply.finish_reason == "tool_calls"
            else:
                assert reply.finish_reason in ("stop", "length") and reply.message.content is not None
        sync = openai.OpenAI(base_url=gateway.v1, api_key="sk-none", max_retries=0, timeout=60)
        again = await asyncio.to_thread(
            sync.chat.completions.create,
            model="hermes",
            messages=history,
            tools=TOOLS,
            tool_choice="required",
            seed=3,
            temperature=1.0,
            max_tokens=300,
        )
        check_calls(again.choices[0].message.tool_calls)
        # n choices each get their own calls
        many = await client.chat.completions.create(
            model="hermes",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            n=3,
            seed=4,
            temperature=1.0,
            max_tokens=300,
        )
        assert len(many.choices) == 3 and all(check_calls(c.message.tool_calls) is None for c in many.choices)


async def test_tools_are_refused_with_the_reason(nats_server, tmp_path, tool_ckpts):
    async with stack(nats_server, tmp_path, tool_ckpts, "tiny", "hermes") as gateway:
        client = gateway.client()
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="does not render tool definitions"):
                await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=stream)
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            await client.chat.completions.create(
                model="hermes",
                messages=ASK,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        bad = [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"type": "string", "pattern": "(?=lookahead)"}},
                    },
                },
            }
        ]
        with pytest.raises(openai.BadRequestError, match="'f'"):
            await client.chat.completions.create(model="hermes", messages=ASK, tools=bad, tool_choice="required")
        with pytest.raises(openai.BadRequestError, match="tool_call_id"):
            await client.chat.completions.create(model="hermes", messages=ASK + [{"role": "tool", "content": "x"}])
        plain = await client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4
        )
        assert plain.choices[0].message.tool_calls is None


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


async def test_langchain_tools_and_structured_output(nats_server, tmp_path, tool_ckpts):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, days: int) -> str:
        """The forecast for a city."""
        return f"{city}: sunny for {days} days"

    async with stack(nats_server, tmp_path, tool_ckpts, "hermes") as gateway:
        llm = langchain_openai.ChatOpenAI(
            model="hermes",
            base_url=gateway.v1,
            api_key="sk-none",
            max_retries=0,
            temperature=1.0,
            seed=5,
            max_tokens=300,
            timeout=60,
        )
        bound = llm.bind_tools([get_weather], tool_choice="required")
        ai = await bound.ainvoke([HumanMessage("Weather in Oslo?")])
        assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
        args = ai.tool_calls[0]["args"]
        assert isinstance(args["city"], str) and isinstance(args["days"], int)
        result = get_weather.invoke(args)
        final = await llm.ainvoke(
            [HumanMessage("Weather in Oslo?"), ai, ToolMessage(result, tool_call_id=ai.tool_calls[0]["id"])]
        )
        assert isinstance(final.content, str)

        for method in ("json_schema", "function_calling"):
            forecast = await llm.with_structured_output(Forecast, method=method).ainvoke("Forecast for Lima?")
            assert isinstance(forecast, Forecast) and 1 <= forecast.days <= 7, method


async def test_the_receipt_commits_to_the_tools_and_the_calls(nats_server, tmp_path, tool_ckpts):
    """The prompt commitment in inference.completed covers the tools offered and the calls in the history:
    `strata receipt verify --messages-file` on the request body recomputes it; another tool list does not."""
    import argparse

    from cli.ledger import _prompt_to_check
    from shared.events import InferenceCompleted
    from shared.prompt_commitment import SALT_HEADER, commit

    async with stack(nats_server, tmp_path, tool_ckpts, "hermes") as gateway:
        history = ASK + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        raw = await gateway.client().chat.completions.with_raw_response.create(
            model="hermes", messages=history, tools=TOOLS, max_tokens=4
        )
        rid, salt = raw.headers["x-request-id"], raw.headers[SALT_HEADER]
        event = await stack.bus.wait(InferenceCompleted, request_id=rid)  # type: ignore[attr-defined]

    def recomputed(body: dict) -> str:
        (tmp_path / "body.json").write_text(json.dumps(body))
        args = argparse.Namespace(prompt=None, prompt_file=None, messages_file=tmp_path / "body.json")
        return commit(_prompt_to_check(args), salt)

    assert recomputed({"model": "hermes", "messages": history, "tools": TOOLS}) == event.prompt_commitment
    assert recomputed({"messages": history, "tools": TOOLS[:1]}) != event.prompt_commitment
    assert recomputed({"messages": history}) != event.prompt_commitment


async def test_the_same_fields_work_over_nats(nats_server, tmp_path, tool_ckpts):
    """A plain NATS program sends the OpenAI-shaped fields in InferenceRequest (plain JSON, no Strata
    imports) and gets tool_calls and schema-valid text back, as the README's program does."""
    from shared import subjects

    async with stack(nats_server, tmp_path, tool_ckpts, "hermes"):
        nc = stack.bus.nc  # type: ignore[attr-defined]

        async def ask(body: dict) -> dict:
            msg = await nc.request(subjects.inference_request("hermes"), json.dumps(body).encode(), timeout=60)
            reply = json.loads(msg.data)
            assert reply["ok"], reply
            return reply["result"]

        called = await ask(
            {
                "model": "hermes",
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": "required",
                "sampling": {"max_tokens": 300, "temperature": 1.0, "seed": 3, "n": 2},
            }
        )
        assert called["finish_reason"] == "tool_calls" and len(called["choices"]) == 2
        for choice in called["choices"]:
            for call in choice["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        shaped = await ask(
            {
                "model": "hermes",
                "messages": ASK,
                "sampling": {
                    "max_tokens": 100,
                    "temperature": 1.0,
                    "seed": 3,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}},
                },
            }
        )
        jsonschema.validate(json.loads(shaped["text"]), WEATHER)


class GetWeather(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


async def test_the_openai_sdk_stream_helper_reads_streamed_calls(nats_server, tmp_path, tool_ckpts):
    """Review finding: continuation deltas carried "type": null, which the SDK's accumulator copied over the
    call's type, so it emitted no argument events and parsed nothing."""
    async with stack(nats_server, tmp_path, tool_ckpts, "hermes") as gateway:
        client = gateway.client()
        kinds = set()
        async with client.chat.completions.stream(
            model="hermes",
            messages=ASK,
            tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
            tool_choice="required",
            seed=2,
            temperature=1.0,
            max_tokens=300,
        ) as stream:
            async for event in stream:
                kinds.add(event.type)
            final = await stream.get_final_completion()
        assert {"tool_calls.function.arguments.delta", "tool_calls.function.arguments.done"} <= kinds
        call = final.choices[0].message.tool_calls[0]
        assert call.type == "function" and isinstance(call.function.parsed_arguments, GetWeather)


async def test_review_findings_on_admission(nats_server, tmp_path, tool_ckpts, monkeypatch):
    """response_format with tools on auto would silently forbid every call: refused. A request cancelled while
    its grammar compiles is cancelled once it is submitted, not run for nobody."""
    import services.inference_worker.service_layer.serving as serving

    async with stack(nats_server, tmp_path, tool_ckpts, "hermes") as gateway:
        client = gateway.client()
        fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
        with pytest.raises(openai.BadRequestError, match="tool_choice auto"):
            await client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, response_format=fmt)
        forced = await client.chat.completions.create(
            model="hermes",
            messages=ASK,
            tools=TOOLS,
            response_format=fmt,
            tool_choice="required",
            seed=1,
            temperature=1.0,
            max_tokens=300,
        )
        check_calls(forced.choices[0].message.tool_calls)

        server = stack.worker.part(Worker).server  # type: ignore[attr-defined]
        loop, compiling, release = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        real = serving.prepare

        def held_prepare(*args):  # the compile takes as long as the test wants
            loop.call_soon_threadsafe(compiling.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
            return real(*args)

        monkeypatch.setattr(serving, "prepare", held_prepare)
        task = asyncio.ensure_future(
            client.chat.completions.create(model="hermes", messages=ASK, max_tokens=200, response_format=fmt)
        )
        await asyncio.wait_for(compiling.wait(), 30)
        (rid,) = list(server.inflight)  # counted against max_inflight while it compiles
        assert server.cancel(rid) and rid in server.cancelled_early
        release.set()
        answer = await task
        assert answer.usage.completion_tokens == 0 and not server.inflight
