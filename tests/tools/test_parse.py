"""Parsing complete generations, and streaming them in random pieces to the same result."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from services.inference_worker.tools import (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, ContentDelta,
                                             ToolCall, ToolCallDelta, collect, new_call_id)


def ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def calls(*pairs):
    return [ToolCall(f"call_{i}", name, args) for i, (name, args) in enumerate(pairs)]


A1 = '{"city": "Paris", "days": 3}'
A2 = '{"q": "a } tricky \\" string ]", "n": [1, {"x": null}]}'

# (format, generated text, expected content, expected calls)
CASES = [
    (HERMES, "plain answer", "plain answer", []),
    (HERMES, f'<tool_call>\n{{"name": "weather", "arguments": {A1}}}\n</tool_call>', None,
     [("weather", A1)]),
    (HERMES, f'Let me look.\n<tool_call>\n{{"name": "weather", "arguments": {A1}}}\n</tool_call>\n'
             f'<tool_call>\n{{"arguments": {A2}, "name": "search"}}\n</tool_call>', "Let me look.",
     [("weather", A1), ("search", A2)]),
    # the end marker may be cut off by a stop token
    (HERMES, f'<tool_call>{{"name": "weather", "arguments": {A1}}}', None, [("weather", A1)]),
    (HERMES, f'<tool_call>{{"name": "weather", "arguments": {A1}}}</tool_call> and after', "and after",
     [("weather", A1)]),
    (HERMES, "a < b and <tool_ is not a marker", "a < b and <tool_ is not a marker", []),
    (LLAMA3_JSON, f'{{"name": "weather", "parameters": {A1}}}', None, [("weather", A1)]),
    (LLAMA3_JSON, f'<|python_tag|>{{"name": "weather", "parameters": {A1}}}; '
                  f'{{"name": "search", "arguments": {A2}}}', None, [("weather", A1), ("search", A2)]),
    (LLAMA3_JSON, 'The set {1, 2} is small.', 'The set {1, 2} is small.', []),
    (LLAMA3_JSON, '{"not": "a call"}', '{"not": "a call"}', []),
    (MISTRAL, f'[TOOL_CALLS] [{{"name": "weather", "arguments": {A1}}}, '
              f'{{"name": "search", "arguments": {A2}, "id": "abcdefghi"}}]', None,
     [("weather", A1), ("search", A2)]),
    (MISTRAL, f'Sure.[TOOL_CALLS][{{"name": "weather", "arguments": {A1}}}]', "Sure.", [("weather", A1)]),
    (MISTRAL_V11, f'[TOOL_CALLS]weather[ARGS]{A1}[TOOL_CALLS]search[ARGS]{A2}', None,
     [("weather", A1), ("search", A2)]),
]

MALFORMED = [
    (HERMES, 'Hi <tool_call>{"name": "f", "arguments": {"a": 1</tool_call> bye'),
    (HERMES, '<tool_call>{"name": "f", "arguments": "not an object"}</tool_call>'),
    (HERMES, '<tool_call>{"arguments": {}}</tool_call>'),
    (HERMES, '<tool_call>not json</tool_call>'),
    (HERMES, '<tool_call>'),
    (LLAMA3_JSON, '<|python_tag|>{"name": "f", "parameters": {"a": tru}}'),
    (MISTRAL, '[TOOL_CALLS] oops'),
    (MISTRAL_V11, '[TOOL_CALLS]no args marker here'),
]


@pytest.mark.parametrize("fmt,text,content,expected", CASES)
def test_parse(fmt, text, content, expected):
    out = fmt.parse(text, ids())
    assert out.content == content
    assert out.tool_calls == calls(*expected)
    for c in out.tool_calls:
        json.loads(c.arguments)


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_malformed_call_stays_content(fmt, text):
    out = fmt.parse(text, ids())
    assert out.tool_calls == []
    assert out.content == text


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, len(text) // 2))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("fmt,text,content,expected", CASES)
def test_streaming_any_split_equals_parse(fmt, text, content, expected):
    want = fmt.parse(text, ids())
    for seed in range(40):
        p = fmt.stream_parser(ids())
        deltas = []
        for piece in random_split(text, random.Random(seed)):
            deltas += p.feed(piece)
        deltas += p.finish()
        assert collect(deltas) == want, seed


def test_stream_deltas_have_openai_shape():
    text = f'Checking.<tool_call>{{"name": "weather", "arguments": {A1}}}</tool_call>'
    p = HERMES.stream_parser(ids())
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
    tool = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert tool[0].to_openai() == {"index": 0, "id": "call_0", "type": "function",
                                   "function": {"name": "weather", "arguments": ""}}
    assert all(d.to_openai() == {"index": 0, "function": {"arguments": d.arguments}} for d in tool[1:])
    assert len(tool) > 2  # the arguments really stream, not in one piece at the end
    assert "".join(d.arguments for d in tool) == A1


def test_partial_marker_is_held_back_until_known():
    p = HERMES.stream_parser(ids())
    assert p.feed("Hello <tool_c") == [ContentDelta("Hello")]
    assert p.feed("ar") == [ContentDelta(" <tool_car")]
    assert p.finish() == []


def test_truncated_call_streams_what_arrived():
    # max_tokens mid-arguments: the header and the fragments that came stay sent
    p = HERMES.stream_parser(ids())
    deltas = p.feed('<tool_call>{"name": "f", "arguments": {"a": 1') + p.finish()
    assert collect(deltas).tool_calls == [ToolCall("call_0", "f", '{"a": 1')]


def test_default_ids_look_like_vllms():
    out = HERMES.parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    (call,) = out.tool_calls
    assert call.id.startswith("call_") and len(call.id) == 29 and call.id[5:].isalnum()
    assert new_call_id() != new_call_id()


def test_parse_never_raises_on_junk():
    rng = random.Random(0)
    alphabet = '{}[]":,; \\abn01<>/_|TOOLCALS'
    for fmt in (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11):
        for _ in range(300):
            text = fmt.start * rng.randint(0, 1) + "".join(rng.choice(alphabet) for _ in range(30))
            fmt.parse(text)
            p = fmt.stream_parser()
            for piece in random_split(text, rng):
                p.feed(piece)
            p.finish()


def test_long_arguments_stream_in_linear_time():
    big = json.dumps({"text": "x" * 200_000, "items": list(range(5000))})
    text = f'<tool_call>{{"name": "f", "arguments": {big}}}</tool_call>'
    p = HERMES.stream_parser(ids())
    deltas = [d for i in range(0, len(text), 7) for d in p.feed(text[i:i + 7])] + p.finish()
    assert collect(deltas).tool_calls == [ToolCall("call_0", "f", big)]


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_streaming_malformed(fmt, text):
    """A call that breaks before its header could go out streams as content, like parse(); one
    that breaks later (bad JSON inside the arguments) already streamed: it stays a call."""
    for seed in range(20):
        p = fmt.stream_parser(ids())
        deltas = [d for piece in random_split(text, random.Random(seed)) for d in p.feed(piece)]
        got = collect(deltas + p.finish())
        if got.tool_calls:
            assert got.tool_calls[0].name == "f" and '"name": "f"' in text, seed
        else:
            assert got == fmt.parse(text, ids()), seed
