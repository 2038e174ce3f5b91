"""A request's tools on the worker, without NATS: what the review found about parallel_tool_calls, the
prompt commitment and the receipt check, and the parameters a function may declare."""
from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError

from cli.ledger import _prompt_to_check
from services.api_gateway.domain.requests import ChatCompletionRequest
from services.inference_worker.service_layer.tool_use import ChoiceStream, ToolUse
from services.inference_worker.tools import HERMES
from shared.inference import InferenceRequest
from shared.structured import FunctionDef

TWO_CALLS = ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
             '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>')
TOOLS = [
    {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("parallel, calls", [(True, 2), (False, 1)])
def test_parallel_tool_calls_false_keeps_an_answer_s_first_call_whole_and_streamed(parallel, calls):
    use = ToolUse(HERMES, TOOLS, None, parallel)
    _, parsed, reason = use.parse(TWO_CALLS, "stop")
    assert len(parsed) == calls and json.loads(parsed[0].function.arguments) == {"x": 1} and reason == "tool_calls"
    stream: ChoiceStream = use.stream()
    deltas = []
    for i in range(0, len(TWO_CALLS), 5):
        deltas += stream.feed(TWO_CALLS[i : i + 5], i + 5 >= len(TWO_CALLS))[1] or []
    assert {d.index for d in deltas} == set(range(calls))


def body_bytes(tmp_path, body) -> bytes:
    (tmp_path / "body.json").write_text(json.dumps(body))
    return _prompt_to_check(argparse.Namespace(prompt=None, prompt_file=None, messages_file=tmp_path / "body.json"))


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ],  # no content key, as OpenAI allows
        [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    ],
)
def test_receipt_verify_recomputes_what_the_worker_committed_to(tmp_path, messages):
    for extra in ({}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"}):
        body = {"model": "m", "messages": messages, **extra}
        worker = ChatCompletionRequest.model_validate(body).to_inference("r").prompt_bytes()
        assert body_bytes(tmp_path, body) == worker
    assert body_bytes(tmp_path, messages) == body_bytes(tmp_path, {"messages": messages})


def test_tools_the_template_never_saw_are_not_in_the_commitment():
    plain = InferenceRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    unseen = InferenceRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none")
    offered = InferenceRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert unseen.prompt_bytes() == plain.prompt_bytes() != offered.prompt_bytes()


def test_a_function_s_parameters_must_describe_an_object():
    with pytest.raises(ValidationError, match="object schema"):
        FunctionDef(name="f", parameters={"type": "string"})
    assert FunctionDef(name="f", parameters={"properties": {}}).parameters == {"properties": {}}
