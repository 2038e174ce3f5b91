"""The tool-call formats Strata understands, as data: the markers around a call and the key its
arguments go under. Everything else (parsing, streaming, grammars) is shared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from .grammar import build_grammar
from .stream import StreamParser
from .types import IdFactory, ParsedOutput, collect, new_call_id


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str                      # the text that opens a run of calls
    end: str = ""                   # closes one call (Hermes' </tool_call>); missing at EOS is forgiven
    separator: str = ""             # between calls of one run without an array (Llama's ";")
    array_open: str = ""            # "[" when the calls come as a JSON array (Mistral)
    args_marker: str = ""           # Mistral v11+: `[TOOL_CALLS]name[ARGS]{...}`
    args_keys: tuple[str, ...] = ("arguments",)
    bare_json_start: bool = False   # Llama may answer with a bare JSON call and no marker
    # grammar: which syntax to force (parsing accepts every variant above)
    force_array: bool = False
    force_named: bool = False
    grammar_joiner: str = ""        # between parallel calls, as the model's template writes them

    def stream_parser(self, id_factory: IdFactory = new_call_id) -> StreamParser:
        return StreamParser(self, id_factory)

    def parse(self, text: str, id_factory: IdFactory = new_call_id) -> ParsedOutput:
        """A complete generation: text outside calls is content; a call whose JSON is malformed
        stays in the content, as written. Never raises."""
        p = StreamParser(self, id_factory, hold_calls=True)
        return collect(p.feed(text) + p.finish())

    def grammar(self, tools: list[dict], tool_choice="required", parallel_tool_calls: bool = True,
                marker_tokens: Mapping[str, int] = {}) -> str | None:
        """See ``grammar.build_grammar``."""
        return build_grammar(self, tools, tool_choice, parallel_tool_calls, marker_tokens)

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.start, self.end, self.args_marker) if m)

    def marker_tokens(self, token_to_id: Callable[[str], int | None]) -> dict[str, int]:
        """The markers the tokenizer has as single tokens (e.g. ``Tokenizer.token_to_id``)."""
        ids = {m: token_to_id(m) for m in self.markers}
        return {m: i for m, i in ids.items() if i is not None}


HERMES = ToolFormat("hermes", start="<tool_call>", end="</tool_call>", grammar_joiner="\n")
LLAMA3_JSON = ToolFormat("llama3_json", start="<|python_tag|>", separator=";",
                         args_keys=("parameters", "arguments"), bare_json_start=True,
                         grammar_joiner="; ")
MISTRAL = ToolFormat("mistral", start="[TOOL_CALLS]", array_open="[", args_marker="[ARGS]",
                     force_array=True, grammar_joiner=", ")
MISTRAL_V11 = ToolFormat("mistral_v11", start="[TOOL_CALLS]", array_open="[", args_marker="[ARGS]",
                         force_named=True)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11)}

# What a template that renders tools for each format contains, most specific first.
_SIGNS: list[tuple[ToolFormat, tuple[str, ...]]] = [
    (MISTRAL_V11, ("[TOOL_CALLS]", "[ARGS]")),
    (MISTRAL, ("[TOOL_CALLS]",)),
    (HERMES, ("<tool_call>",)),
    (LLAMA3_JSON, ('"parameters"', "tools")),
    (LLAMA3_JSON, ("<|python_tag|>", "tools")),
]

# Formats that reuse one of the markers above around a syntax that is not JSON.
_OTHER_FORMATS = ("<function=",)  # Qwen3-Coder: <tool_call><function=name><parameter=...>


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The format a model was trained to call tools in, from the markers its chat template writes;
    None when the template does not render tools at all."""
    if not chat_template or "tools" not in chat_template:
        return None
    if any(s in chat_template for s in _OTHER_FORMATS):
        return None
    for fmt, signs in _SIGNS:
        if all(s in chat_template for s in signs):
            return fmt
    return None


def unsupported_reason(chat_template: str | None) -> str | None:
    """Why `tools` cannot be served with this template (for the worker's 400), or None if they can."""
    if not chat_template:
        return "the model has no chat template, so tool definitions cannot be rendered into its prompt"
    if "tools" not in chat_template:
        return "the model's chat template does not render tool definitions (it never reads `tools`)"
    if detect_format(chat_template) is None:
        return ("the model's chat template renders tools, but in a tool-call format Strata does not "
                "parse (known: " + ", ".join(FORMATS) + ")")
    return None
