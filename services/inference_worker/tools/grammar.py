"""llguidance grammars that force a generation to be tool call(s) in a format's own syntax: the
function name one of those allowed, its arguments valid against that function's JSON schema.

Only ``tool_choice`` "required" or a named function gets a grammar. "auto" leaves the model free
(no grammar; the output is parsed afterwards), and "none" means the worker does not pass the tools
to the chat template at all, so the model has nothing to call."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping

# JSON_STYLE is the spacing `tojson` renders in the prompts, so forced calls look like the ones the model saw
from services.inference_worker.engine.guided import JSON_STYLE, closed

if TYPE_CHECKING:
    from .formats import ToolFormat



class GrammarError(ValueError):
    """The request's tools cannot be turned into a grammar; `reason` is fit for a 400."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def chosen_tools(tools: list[dict], tool_choice) -> list[dict] | None:
    """The tools a grammar must allow, or None when tool_choice forces nothing."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise GrammarError("tool_choice requires a tool call, but no tools were given")
    fns = [t.get("function", t) for t in tools]
    if tool_choice == "required":
        return fns
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        want = (tool_choice.get("function") or {}).get("name")
        picked = [f for f in fns if f.get("name") == want]
        if not picked:
            raise GrammarError(f"tool_choice names function {want!r}, which is not among the tools")
        return picked[:1]
    raise GrammarError(f"unsupported tool_choice: {tool_choice!r}")


def _lit(text: str, special: Mapping[str, int]) -> str:
    # llguidance treats every added token as special: such a marker only matches as that token id.
    return f"<[{special[text]}]>" if text in special else json.dumps(text)


def _args_rule(fn: dict) -> str:
    schema = closed(dict(fn.get("parameters") or {}))
    schema.setdefault("type", "object")  # OpenAI's arguments are always an object
    schema["x-guidance"] = {**JSON_STYLE, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema)


def to_lark(fmt: "ToolFormat", fns: list[dict], parallel: bool,
            special: Mapping[str, int] = {}) -> str:
    key = fmt.args_keys[0]
    rules, names = [], []
    for i, fn in enumerate(fns):
        name = fn["name"]
        if fmt.force_named:
            head = f"{_lit(fmt.start, special)} {json.dumps(name)} {_lit(fmt.args_marker, special)}"
            tail = ""
        else:
            head = json.dumps('{"name": ' + json.dumps(name) + f', "{key}": ')
            tail = ' "}"'
            if fmt.end:  # one marker pair per call
                head = f'{_lit(fmt.start, special)} "\\n" {head}'
                tail += f' "\\n" {_lit(fmt.end, special)}'
        rules += [f"call_{i}: {head} args_{i}{tail}", f"args_{i}: {_args_rule(fn)}"]
        names.append(f"call_{i}")
    sep = json.dumps(fmt.grammar_joiner) + " " if fmt.grammar_joiner else ""
    body = f"call ({sep}call)*" if parallel else "call"
    # the space after the marker is how Mistral's own template writes `[TOOL_CALLS] [`
    start = f'{_lit(fmt.start, special)} " [" {body} "]"' if fmt.force_array else body
    return "\n".join(["%llguidance {}", f"start: {start}", "call: " + " | ".join(names), *rules])


def build_grammar(fmt: "ToolFormat", tools: list[dict], tool_choice, parallel_tool_calls: bool,
                  marker_tokens: Mapping[str, int] = {}) -> str | None:
    """The llguidance grammar (for ``LLMatcher``), or None when tool_choice forces no call.
    `marker_tokens` maps the format's markers that are single (added or special) tokens in the
    model's tokenizer to their ids (see ``ToolFormat.marker_tokens``): llguidance only lets such a
    marker be produced as that token. Raises GrammarError when a schema cannot be compiled."""
    import llguidance

    fns = chosen_tools(tools, tool_choice)
    if fns is None:
        return None
    for fn in fns:
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError(f"a tool has no function name: {fn!r}")
    grammar = llguidance.LLMatcher.grammar_from_lark(
        to_lark(fmt, fns, parallel_tool_calls, marker_tokens))
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        # name the culprit: compile each function's schema on its own
        for fn in fns:
            one = llguidance.LLMatcher.grammar_from_lark(f"start: {_args_rule(fn)}")
            if llguidance.LLMatcher.validate_grammar(one):
                raise GrammarError(f"the parameters schema of function {fn['name']!r} cannot be "
                                   f"enforced: {llguidance.LLMatcher.validate_grammar(one)}")
        raise GrammarError(f"the tool-call grammar does not compile: {err}")
    return grammar
