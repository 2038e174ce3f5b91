"""Chat templates written for these tests (tests/tools/templates), one per tool-call format, each
following that format's documented conventions: which format each one speaks, and a conversation
with tools, a call and its result rendered through them."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from services.inference_worker.engine.tokenizer import Tokenizer
from services.inference_worker.tools import (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, detect_format,
                                             unsupported_reason)
from services.inference_worker.tools.render import mistral_call_id, template_messages

TEMPLATES = Path(__file__).parent / "templates"
EXPECTED = {"hermes": HERMES, "qwen": HERMES, "llama3_json": LLAMA3_JSON, "mistral": MISTRAL}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "City name"}}}}}]
CALL_ID = "call_Ab3dEf6hIj9kLm2nOp5qRs8t"
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 C"},
]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


class _NoTokens:  # apply_chat_template renders text only; no vocabulary needed
    def token_to_id(self, _):
        return None


def render(name: str, messages: list[dict], tools=TOOLS, **kwargs) -> str:
    tok = Tokenizer(_NoTokens(), bos_token="<s>", eos_token="</s>", chat_template=template(name))
    return tok.apply_chat_template(messages, tools=tools, **kwargs)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fixtures_are_our_own(name):
    assert template(name).startswith("{#- Written for Strata's tests, following ")
    assert "not a copy of any model's template" in template(name)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detects_format(name):
    assert detect_format(template(name)) is EXPECTED[name]
    assert unsupported_reason(template(name)) is None


def test_detects_mistral_v11_form():
    # newer Mistral templates write `[TOOL_CALLS]name[ARGS]{...}`
    tpl = "{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}{% endif %}[TOOL_CALLS]{{ c.name }}[ARGS]"
    assert detect_format(tpl) is MISTRAL_V11


def test_template_without_tools_is_refused_with_a_reason():
    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    assert detect_format(plain) is None and detect_format(None) is None
    assert "does not render tool" in unsupported_reason(plain)
    assert "no chat template" in unsupported_reason(None)
    other = "{% if tools %}<function_calls>{{ tools | tojson }}</function_calls>{% endif %}"
    assert "format Strata does not parse" in unsupported_reason(other)
    qwen3_coder = "{% if tools %}<tool_call>\n<function={{ name }}>\n<parameter=x>{% endif %}"
    assert detect_format(qwen3_coder) is None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_renders_tools_call_and_result(name):
    fmt = detect_format(template(name))
    prompt = render(name, template_messages(CONVERSATION, fmt), add_generation_prompt=name != "mistral")
    assert "get_weather" in prompt and "Current weather for a city" in prompt  # the schema
    assert '"city": "Paris"' in prompt and '"{\\"city' not in prompt  # arguments once encoded
    assert "sunny, 21 C" in prompt  # the result
    if fmt.name == "mistral":
        assert f'"id": "{mistral_call_id(CALL_ID)}"' in prompt
        assert f'"call_id": "{mistral_call_id(CALL_ID)}"' in prompt
    # the call, written the way the model writes it, parses back
    call_text = prompt[prompt.rindex(fmt.start if fmt.start in prompt else '{"name": "'):]
    parsed = fmt.parse(call_text)
    assert parsed.tool_calls and parsed.tool_calls[0].name == "get_weather"
    assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}


def test_messages_for_templates():
    out = template_messages(CONVERSATION, HERMES)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[1]["content"] == "" and out[2]["name"] == "get_weather"
    assert out[2]["tool_call_id"] == CALL_ID
    assert CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # copied
    m = template_messages(CONVERSATION, MISTRAL)
    assert m[1]["tool_calls"][0]["id"] == m[2]["tool_call_id"] == "nOp5qRs8t"
    assert mistral_call_id("x") == mistral_call_id("x") and len(mistral_call_id("x")) == 9
    assert mistral_call_id("x").isalnum()
    bad = [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]}]
    assert template_messages(bad)[0]["tool_calls"][0]["function"]["arguments"] == "[1]"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parallel_calls_as_the_template_writes_them_parse_back(name):
    fmt = detect_format(template(name))
    ids = ["call_1aaaaaaaaaaaaaaaaaaaaaaaa", "call_2bbbbbbbbbbbbbbbbbbbbbbbb"]
    calls = [{"id": i, "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
             for i, c in zip(ids, ["Rome", "Oslo"])]
    conv = [{"role": "user", "content": "Rome and Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": calls}]
    prompt = render(name, template_messages(conv, fmt), add_generation_prompt=False)
    answer = prompt[prompt.rindex("Rome and Oslo?"):]
    answer = answer[answer.index(fmt.start if fmt.start in answer else '{"name": "'):]
    # the calls are joined the way the format's grammar joins forced parallel calls
    joined = fmt.end + fmt.grammar_joiner + fmt.start if fmt.end else "}" + fmt.grammar_joiner + "{"
    assert answer.count(joined) == 1
    parsed = fmt.parse(answer)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_without_tools_the_templates_write_no_tool_syntax(name):
    fmt = detect_format(template(name))
    prompt = render(name, [{"role": "system", "content": "Be brief."}, CONVERSATION[0]], tools=None)
    assert "Be brief." in prompt and CONVERSATION[0]["content"] in prompt
    assert "get_weather" not in prompt and fmt.start not in prompt and '"parameters"' not in prompt


def test_mistral_template_needs_the_short_ids():
    # Mistral's templates refuse OpenAI's long call ids: template_messages shortens them
    with pytest.raises(jinja2.TemplateError, match="9 characters"):
        render("mistral", CONVERSATION)
