"""The values the tool-call module hands back: parsed calls and OpenAI-shaped stream deltas."""
from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Callable, Union

_ALNUM = string.ascii_letters + string.digits

IdFactory = Callable[[], str]


def new_call_id() -> str:
    """`call_` + 24 random alphanumerics, the shape vLLM gives (OpenAI's own ids look alike)."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, exactly as OpenAI's API carries it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None  # None when there is none but whitespace, as OpenAI sends beside tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One entry of `choices[0].delta.tool_calls`. The first delta of a call carries id and name
    (and arguments ""); later ones carry only index and an arguments fragment."""
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Delta = Union[ContentDelta, ToolCallDelta]


def collect(deltas: list[Delta]) -> ParsedOutput:
    """Fold stream deltas into what a non-streamed response carries."""
    text, calls = [], {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            text.append(d.text)
        elif d.id is not None:
            calls[d.index] = [d.id, d.name, d.arguments]
        else:
            calls[d.index][2] += d.arguments
    content = "".join(text)
    return ParsedOutput(content if content.strip() else None,
                        [ToolCall(*calls[i]) for i in sorted(calls)])
