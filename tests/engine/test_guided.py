"""Grammar-constrained decoding (guided.py) on random-weight checkpoints: every finished output of a
JSON-schema request parses and validates, constrained rows share batches with free ones without
changing them, and a grammar that cannot compile is refused with llguidance's reason."""
from __future__ import annotations

import json
import re

import pytest

from services.inference_worker.engine import Constraint, GrammarError, InvalidRequestError, SamplingParams

from .conftest import PROMPTS

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# Bounded, so that random weights finish it within max_tokens: strings have a maxLength, numbers a range.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "colour", "tags"],
    "additionalProperties": False,
}


def schema_params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=200, constraint=Constraint("json_schema", json.dumps(SCHEMA)), **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_schema_request_returns_valid_json(engines, arch):
    engine = engines(arch)
    params = [schema_params(temperature=1.0, seed=s) for s in range(16)] + [schema_params(temperature=0)]
    outs = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text, out.error)
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 8  # the seeds still sample: the mask narrows, it does not decide


def test_json_object_parses_when_it_finishes(engines, tokenizer_dir):
    """json_object is any JSON object. Random weights rarely close a string on their own, so a logit bias
    towards '"' and '}' (ids from the tokenizer) lets them finish; the grammar keeps the rest valid."""
    engine = engines("llama")
    favoured = {engine.tokenizer.token_to_id(t): 8.0 for t in ('"', "}")}
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=s, logit_bias=favoured, constraint=Constraint("json"))
        for s in range(12)
    ]
    outs = engine.generate(["It was"] * len(params), params)
    for out in outs:
        assert out.finish_reason == "stop", (out.text, out.error)
        assert isinstance(json.loads(out.text), dict), out.text


def test_a_length_cut_leaves_a_valid_prefix_and_says_length(engines):
    engine = engines("llama")
    long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 30}}, "required": ["s"]}
    out = engine.generate(
        "It was",
        SamplingParams(max_tokens=5, temperature=1.0, seed=3, constraint=Constraint("json_schema", json.dumps(long))),
    )[0]
    assert out.finish_reason == "length" and out.text.startswith('{"s"'), out.text


def test_free_rows_in_a_constrained_batch_are_unchanged(engines):
    engine = engines("qwen2")
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = engine.generate(PROMPTS[:2], [free, free])
    mixed = engine.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1]], [free, schema_params(temperature=0), free])
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    jsonschema.validate(json.loads(mixed[1].text), SCHEMA)


def test_a_lark_grammar_bounds_the_answer(engines):
    engine = engines("llama")
    grammar = Constraint("grammar", 'start: "yes" | "no" | "maybe so"')
    outs = engine.generate(
        PROMPTS,
        [SamplingParams(max_tokens=20, temperature=1.0, seed=s, constraint=grammar) for s in range(len(PROMPTS))],
    )
    assert {o.text for o in outs} <= {"yes", "no", "maybe so"}
    assert all(o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize(
    "constraint, reason",
    [
        (Constraint("json_schema", '{"type": "nonsense"}'), "nonsense"),
        (Constraint("json_schema", '[1, 2]'), "not a JSON object"),
        (Constraint("grammar", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_a_grammar_that_cannot_compile_is_refused_with_its_reason(engines, constraint, reason):
    engine = engines("llama")
    params = SamplingParams(max_tokens=4, constraint=constraint)
    with pytest.raises(GrammarError, match=reason) as caught:
        engine.add_request("It was", params, reject_invalid=True)
    assert isinstance(caught.value, InvalidRequestError)
    out = engine.generate("It was", params)[0]  # not rejecting: the request finishes with the reason
    assert out.finish_reason == "error" and reason in out.error and out.token_ids == []


def test_objects_that_list_properties_are_closed_unless_they_say_otherwise():
    from services.inference_worker.engine.guided import closed

    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "b": {"type": "object", "properties": {}, "additionalProperties": True},
            "c": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string"}}}},
            "d": {"allOf": [{"type": "object", "properties": {"z": {"type": "integer"}}}]},
            "properties": {"type": "object"},
        },
    }  # a property named "properties" is a name, not a keyword
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["b"]["additionalProperties"] is True
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["d"]["allOf"][0]
    assert out["properties"]["properties"] == {"type": "object"}  # no properties listed: left open
    assert schema["properties"]["a"] == {"type": "object", "properties": {"x": {"type": "integer"}}}  # not mutated

    # review finding: closing these changed what they accept (and made some unsatisfiable)
    union = {
        "type": "object",
        "properties": {"c": {"type": "string"}},
        "anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}],
    }
    assert closed(union) == union
    assert "additionalProperties" not in closed({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]})
    assert "additionalProperties" not in closed({"type": "object", "properties": {"a": {}}, "$ref": "#/$defs/x"})


def test_a_schema_without_additional_properties_gets_only_its_own_keys(engines):
    """A random-weight model would otherwise invent keys: 'valid' JSON Schema, useless arguments."""
    engine = engines("llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    params = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=s, constraint=Constraint("json_schema", json.dumps(schema)))
        for s in range(8)
    ]
    for out in engine.generate(["It was"] * len(params), params):
        assert out.finish_reason == "stop" and set(json.loads(out.text)) == {"n"}, out.text


def test_the_built_in_model_answers_in_the_schema():
    """The model `strata up` serves out of the box (trained on the KJV, 256 tokens of context)."""
    from builtin_model import MODEL_DIR as model_dir
    from services.inference_worker.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(device="cpu", dtype="float32", num_blocks=64))
    schema = {
        "type": "object",
        "required": ["book", "chapter"],
        "properties": {
            "book": {"enum": ["Genesis", "Exodus", "Psalms"]},
            "chapter": {"type": "integer", "minimum": 1, "maximum": 150},
        },
    }
    params = [
        SamplingParams(max_tokens=40, temperature=0.8, seed=s, constraint=Constraint("json_schema", json.dumps(schema)))
        for s in range(6)
    ]
    outs = [
        engine.generate(engine.tokenizer.encode_chat([{"role": "user", "content": "Where is it written?"}]), p)[0]
        for p in params
    ]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


NESTED = "^(((a{99}){99}){99}){9}$"  # a lexer with ~10^6 states: past guided.LIMITS


def test_a_grammar_past_the_limits_at_its_first_mask_is_refused_before_it_starts(engines):
    engine = engines("llama")
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": NESTED}}, "required": ["s"]}
    with pytest.raises(GrammarError, match="too (complex|expensive) to enforce"):
        engine.add_request(
            "It was",
            SamplingParams(max_tokens=8, constraint=Constraint("json_schema", json.dumps(schema))),
            reject_invalid=True,
        )


def test_a_limit_hit_mid_answer_fails_the_request_and_is_not_served_again_from_the_cache(engines):
    """Review finding: the failed matcher's mask allows only EOS, which used to end the answer as a "stop"
    with broken JSON, and the cached grammar then failed every later copy at once."""
    engine = engines("llama")
    schema = {
        "type": "object",
        "properties": {"first": {"type": "boolean"}, "s": {"type": "string", "pattern": NESTED}},
        "required": ["first", "s"],
    }
    constraint = Constraint("json_schema", json.dumps(schema))
    for seed in range(2):
        out = engine.generate(
            "It was", SamplingParams(max_tokens=60, temperature=1.0, seed=seed, constraint=constraint)
        )[0]
        # failed mid-answer, or (on a slow machine) refused at its warm-up mask: an error either way, never a stop
        assert out.finish_reason == "error", (out.finish_reason, out.text)
        assert re.search("constrained decoding failed|too (complex|expensive) to enforce", out.error), out.error
        assert constraint.grammar() not in engine._guide._compiled  # forgotten: the next request compiles afresh


def test_a_row_whose_mask_blows_the_step_budget_fails_alone(engines, monkeypatch):
    from services.inference_worker.engine import guided

    engine = engines("qwen2")
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    engine.compile(constraint)  # compiled and warmed within the budget first
    monkeypatch.setattr(guided, "MASK_BUDGET_S", 0.0)  # then every step is over it
    free, bound = engine.generate(
        [PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=6, temperature=0), schema_params()]
    )
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    assert bound.finish_reason == "error" and "over the budget" in bound.error
