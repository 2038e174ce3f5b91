"""Grammar-constrained decoding with llguidance: a request's ``Constraint`` becomes a matcher that says,
before each sampled token, which tokens keep the output inside the grammar.

The engine applies it as a per-row token mask in the batched sampler (the masked logits are what
greedy, temperature and the penalties see), and feeds each sampled token back to the matcher. A
grammar that can take no more text ends the request with finish_reason "stop"; running out of
``max_tokens`` first still ends it with "length", as OpenAI does, and the text is then a prefix."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import InvalidRequestError

# Compact JSON with a space after ':' and ',' (how most models were trained to write it). Flexible
# whitespace lets a weak model pad forever; a schema may still ask for it in its "x-guidance".
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``json``: any JSON object (OpenAI's ``json_object``); ``json_schema``:
    the schema in ``spec``; ``grammar``: a llguidance grammar (Lark text, or its JSON form) in ``spec``."""
    kind: Literal["json", "json_schema", "grammar"]
    spec: str = ""

    def grammar(self) -> str:
        import llguidance

        if self.kind == "grammar":
            return self.spec if self.spec.lstrip().startswith("{") else llguidance.LLMatcher.grammar_from_lark(self.spec)
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_STYLE)
        try:
            schema = json.loads(self.spec)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not JSON: {e}") from e
        if not isinstance(schema, dict):
            raise GrammarError(f"the JSON schema is not a JSON object: {self.spec[:100]}")
        return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_STYLE)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_KEYS = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "not", "if", "then", "else",
                "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")


def closed(schema):
    """The schema with every object that lists ``properties`` and says nothing of others closed to them
    (``additionalProperties: false``), as OpenAI's strict mode requires and vLLM's default grammar engine
    assumes: "valid" would otherwise let a model append keys of its own invention. ``allOf`` branches are
    left open, since closing them would make their combination unsatisfiable."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    if "properties" in out and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


class GrammarError(InvalidRequestError):
    """The constraint cannot be compiled (an unsupported or malformed schema or grammar); says why."""


class Guide:
    """One per engine: the tokenizer in llguidance's form, and compiled grammars kept by their text
    (compiling can take 100 ms and more; the n choices of one request, and repeated schemas, share it)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int], cache_size: int = 64):
        import llguidance

        self._llg = llguidance
        self.vocab_size, self.cache_size = vocab_size, cache_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_ids or None)
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # add_request runs on any thread

    def matcher(self, constraint: Constraint):
        """A fresh matcher for one request; raises GrammarError with llguidance's reason."""
        grammar = constraint.grammar()
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        compiled = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise GrammarError(_reason(compiled.get_error()))
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()


def allowed_tokens(matchers: list, vocab_size: int, device: torch.device) -> Tensor | None:
    """[B, vocab_size] bool, True where a row may sample the token (all True for a row without a
    matcher); None when no row is constrained. The matchers' tokenizer has n_vocab = vocab_size."""
    if all(m is None for m in matchers):
        return None
    words = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            row = words[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    # unpacked where the logits are: a GPU gets 1/32 of the bytes a bool mask would take
    words = words.to(device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=device)) & 1  # bit j of word w: token 32w + j
    return bits.flatten(1)[:, :vocab_size].bool()


def _reason(error: str) -> str:
    """llguidance's message, without the grammar it sometimes echoes in full."""
    first = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return f"the grammar cannot be compiled: {first[:500]}"
