"""Grammars: random sampling under the llguidance mask always yields calls that parse and
validate, for every format, with the markers as (special) tokens as the real models have them."""
from __future__ import annotations

import json

import pytest
import torch

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from services.inference_worker.tools import FORMATS, HERMES, LLAMA3_JSON, MISTRAL, collect  # noqa: E402
from services.inference_worker.tools.grammar import GrammarError  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                       "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                      "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["q"],
                       "properties": {"q": {"type": "string", "maxLength": 12},
                                      "exact": {"type": "boolean"}}}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CORPUS = ['{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
          '{"name": "search", "parameters": {"q": "hello world", "exact": true}}',
          "The quick brown fox jumps over the lazy dog. 0123456789 [] {} , ; :"]
# marker -> whether the real models' tokenizers have it as a special token
MARKERS = {"hermes": {"<tool_call>": False, "</tool_call>": False},
           "llama3_json": {"<|python_tag|>": True},
           "mistral": {"[TOOL_CALLS]": True, "[ARGS]": True},
           "mistral_v11": {"[TOOL_CALLS]": True, "[ARGS]": True}}


def build_tokenizer(markers: dict[str, bool]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens([AddedToken(m, special=False) for m, s in markers.items() if not s])
    tok.add_special_tokens([AddedToken(m, special=True) for m, s in markers.items() if s])
    return tok


def sample(tok, grammar: str, seed: int, max_steps: int = 2000) -> str:
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id("<|eos|>")
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=n_vocab, eos_token=eos)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    gen = torch.Generator().manual_seed(seed)
    row = torch.zeros((lltok.vocab_size + 31) // 32, dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    ids = []
    for _ in range(max_steps):
        if matcher.is_stopped():
            break
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        allowed = ((row.unsqueeze(1) >> shifts) & 1).flatten()[:n_vocab].bool()
        logits = torch.randn(n_vocab, generator=gen).masked_fill(~allowed, float("-inf"))
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert matcher.consume_token(t), matcher.get_error()
        if t == eos:
            break
        ids.append(t)
    else:
        pytest.fail("sampling did not finish")
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("parallel", [False, True])
def test_sampled_outputs_are_valid_calls(fmt_name, parallel):
    fmt, markers = FORMATS[fmt_name], MARKERS[fmt_name]
    tok = build_tokenizer(markers)
    grammar = fmt.grammar(TOOLS, "required", parallel, marker_tokens=fmt.marker_tokens(tok.token_to_id))
    seen, most = set(), 0
    for seed in range(30):
        text = sample(tok, grammar, seed)
        out = fmt.parse(text, lambda: "call_x")
        assert out.tool_calls and out.content is None, text
        most = max(most, len(out.tool_calls))
        p = fmt.stream_parser(lambda: "call_x")  # streamed token by token: the same calls
        assert collect([d for i in range(0, len(text), 3) for d in p.feed(text[i:i + 3])]
                       + p.finish()) == out
        for call in out.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            seen.add(call.name)
    assert seen == set(SCHEMAS)  # both tools reachable
    assert most > 1 if parallel else most == 1


def test_named_tool_choice_allows_only_that_function():
    tok = build_tokenizer(MARKERS["hermes"])
    grammar = HERMES.grammar(TOOLS, {"type": "function", "function": {"name": "search"}}, True,
                             marker_tokens=HERMES.marker_tokens(tok.token_to_id))
    for seed in range(30):
        assert {c.name for c in HERMES.parse(sample(tok, grammar, seed)).tool_calls} == {"search"}


@pytest.mark.parametrize("choice", ["auto", "none", None])
def test_no_grammar_unless_a_call_is_required(choice):
    assert LLAMA3_JSON.grammar(TOOLS, choice, True) is None


def test_unknown_named_tool_is_refused():
    with pytest.raises(GrammarError, match="'nope'"):
        HERMES.grammar(TOOLS, {"type": "function", "function": {"name": "nope"}}, False)


def test_required_without_tools_is_refused():
    with pytest.raises(GrammarError, match="no tools"):
        MISTRAL.grammar([], "required", False)


def test_schema_llguidance_cannot_compile_names_the_function():
    bad = TOOLS + [{"type": "function", "function": {
        "name": "lookahead", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(?=x)a"}}}}}]
    with pytest.raises(GrammarError) as e:
        HERMES.grammar(bad, "required", True)
    assert "'lookahead'" in e.value.reason and "look-around" in e.value.reason
    with pytest.raises(GrammarError, match="does not exist"):
        HERMES.grammar([{"type": "function", "function": {"name": "r", "parameters": {"$ref": "#/x"}}}],
                       "required", False)


def test_schemaless_function_still_gets_object_arguments():
    tok = build_tokenizer(MARKERS["hermes"])
    tools = [{"type": "function", "function": {"name": "ping"}}]
    grammar = HERMES.grammar(tools, "required", False, marker_tokens=HERMES.marker_tokens(tok.token_to_id))
    assert '"type": "object"' in grammar
