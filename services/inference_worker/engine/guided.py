"""Grammar-constrained decoding with llguidance: a request's ``Constraint`` becomes a matcher that says,
before each sampled token, which tokens keep the output inside the grammar.

The engine applies it as a per-row token mask in the batched sampler (the masked logits are what
greedy, temperature and the penalties see), and feeds each sampled token back to the matcher. A
grammar that can take no more text ends the request with finish_reason "stop"; running out of
``max_tokens`` first still ends it with "length", as OpenAI does, and the text is then a prefix."""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from .errors import InvalidRequestError

# Compact JSON with a space after ':' and ',' (how most models were trained to write it). Flexible
# whitespace lets a weak model pad forever; a schema may still ask for it in its "x-guidance".
# oneOf (pydantic's discriminated unions) is enforced as anyOf: exact for disjoint branches, as theirs are.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}
# llguidance's resource limits, tighter than its defaults: the masks are computed on the engine thread
# before every step, so one request's pathological pattern or 200 kB const would slow every request in
# the batch (seconds per step at the defaults). These bound a row's mask to roughly 10 ms and its lexer
# to about 50 MB; a grammar past them fails its warm-up mask at compile time, a 400 that says why.
# Legitimate large schemas (300 enum properties, 200 kB) stay under them.
LIMITS = dict(step_lexer_fuel=100_000, initial_lexer_fuel=500_000, step_max_items=25_000, max_lexer_states=25_000,
              max_grammar_size=200_000, verbose_errors=False)
# What one row's mask may cost in one step. The limits above do not bound everything (a 200 kB const
# costs ~70 ms a step within them): a grammar over this at its warm-up is refused, and a row over it
# later fails with finish_reason "error" instead of slowing the whole batch.
MASK_BUDGET_S = 0.1


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``json``: any JSON object (OpenAI's ``json_object``); ``json_schema``:
    the schema in ``spec``; ``grammar``: a llguidance grammar (Lark text, or its JSON form) in ``spec``."""
    kind: Literal["json", "json_schema", "grammar"]
    spec: str = ""

    def grammar(self) -> str:
        """llguidance's grammar for it (GrammarError when the spec is not even JSON)."""
        return _grammar(self.kind, self.spec)


@lru_cache(maxsize=256)  # the n choices, and add_request after the off-loop compile, convert it once
def _grammar(kind: str, spec: str) -> str:
    import llguidance

    if kind == "grammar":
        return spec if spec.lstrip().startswith("{") else llguidance.LLMatcher.grammar_from_lark(spec)
    if kind == "json":
        spec = '{"type": "object"}'
    try:
        schema = json.loads(spec)
    except ValueError as e:
        raise GrammarError(f"the JSON schema is not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise GrammarError(f"the JSON schema is not a JSON object: {spec[:100]}")
    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_STYLE)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_KEYS = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")


_APPLICATORS = {"anyOf", "oneOf", "allOf", "if", "then", "else", "dependentSchemas", "dependentRequired", "$ref", "not"}


def closed(schema, close_self: bool = True):
    """The schema with its plain objects closed to keys they do not list (``additionalProperties: false``),
    as OpenAI's strict mode requires and vLLM's default grammar engine assumes: "valid" would otherwise
    let a model append keys of its own invention. An object is plain when it lists ``properties``, says
    nothing of other keys, combines with no other schema (``anyOf``, ``allOf``, ``$ref``, ``if``...) and
    requires only names it lists; closing any other would change what it accepts. The branches of a
    combination whose parent lists properties stay open for the same reason."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    branches_open = "properties" in out
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [
                closed(sub, close_self=key == "prefixItems" or key == "items" or not branches_open) for sub in out[key]
            ]
    props = out.get("properties")
    plain = (
        isinstance(props, dict)
        and not _APPLICATORS & out.keys()
        and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys()
        and set(out.get("required") or []) <= set(props)
    )
    if close_self and plain:
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
        self._refused: OrderedDict[str, str] = OrderedDict()  # grammar -> why: a refusal is not recomputed
        self._lock = threading.Lock()  # add_request runs on any thread

    def matcher(self, constraint: Constraint):
        """A fresh matcher for one request; raises GrammarError with llguidance's reason. A new grammar
        is compiled and its first mask computed here (where the lexer is built, and where a grammar past
        LIMITS fails), so that cost falls on the caller, off the engine thread, and a request is refused
        before it starts rather than failing mid-answer."""
        grammar = constraint.grammar()
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
            if grammar in self._refused:
                raise GrammarError(self._refused[grammar])
        try:
            compiled = self._compile(grammar)
        except GrammarError as e:
            with self._lock:
                self._refused[grammar] = str(e)
                while len(self._refused) > self.cache_size:
                    self._refused.popitem(last=False)
            raise
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def _compile(self, grammar: str):
        compiled = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._llg.LLParserLimits(**LIMITS))
        if not compiled.is_error():
            warm, slow = compiled.deep_copy(), []
            allowed_tokens([warm], self.vocab_size, torch.device("cpu"), slow)
            if warm.is_error():
                raise GrammarError(_reason(warm.get_error(), "the grammar is too complex to enforce"))
            if slow:
                raise GrammarError(
                    f"the grammar is too expensive to enforce: its first token mask took "
                    f"{slow[0][1] * 1e3:.0f} ms, over the {MASK_BUDGET_S * 1e3:.0f} ms a step allows "
                    f"(very long const/enum strings or nested repetitions in a pattern)"
                )
        if compiled.is_error():
            raise GrammarError(_reason(compiled.get_error()))
        return compiled

    def forget(self, constraint: Constraint) -> None:
        """Drop a compiled grammar whose matcher failed mid-answer: its copies share lexer state, so
        the next request gets a fresh compile rather than the failure."""
        with self._lock:
            self._compiled.pop(constraint.grammar(), None)


def allowed_tokens(
    matchers: list, vocab_size: int, device: torch.device, slow: list[tuple[int, float]] | None = None
) -> Tensor | None:
    """[B, vocab_size] bool, True where a row may sample the token (all True for a row without a
    matcher); None when no row is constrained. The matchers' tokenizer has n_vocab = vocab_size.
    ``slow`` gets (row, seconds) for each row whose mask took over MASK_BUDGET_S."""
    if all(m is None for m in matchers):
        return None
    words = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            # the thread's CPU time, not the wall clock: a busy machine descheduling the thread is not the
            # grammar's cost
            row, started = words[i], time.thread_time()
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
            took = time.thread_time() - started
            if slow is not None and took > MASK_BUDGET_S:
                slow.append((i, took))
    # unpacked where the logits are: a GPU gets 1/32 of the bytes a bool mask would take
    words = words.to(device, non_blocking=True)
    bits = (
        words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=device)
    ) & 1  # bit j of word w: token 32w + j
    return bits.flatten(1)[:, :vocab_size].bool()


def _reason(error: str, what: str = "the grammar cannot be compiled") -> str:
    """llguidance's message, its first line only (the rest can be its parser state)."""
    first = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return f"{what}: {first.removesuffix('<non-verbose/>').strip()[:500]}"
