"""A chat request's tools on this worker: the model's tool-call format (from its chat template), the
messages and tools as the template takes them, the grammar that forces a call when ``tool_choice`` is
``required`` or names a function, and the parsing of each choice's output, whole or streamed, into
content and OpenAI tool calls. The formats themselves are in services/inference_worker/tools."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shared import errors
from shared.inference import FinishReason, InferenceRequest
from shared.structured import FunctionCall, FunctionDelta, ToolCall, ToolCallDelta
from services.inference_worker.engine import Constraint, SamplingParams, Tokenizer
from services.inference_worker.tools import (ContentDelta, GrammarError, ToolFormat, detect_format, template_messages,
                                             unsupported_reason)
from services.inference_worker.tools import ToolCallDelta as ParsedDelta
from services.inference_worker.tools.stream import StreamParser


def chat_messages(request: InferenceRequest, tokenizer: Tokenizer | None) -> list[dict] | None:
    """The request's messages as the chat template takes them: earlier tool calls and results are
    reshaped for the model's format (arguments as objects, results named) even when this request has no tools."""
    if not request.messages:
        return None
    messages = [m.model_dump() for m in request.messages]
    if any(m.tool_calls or m.tool_call_id for m in request.messages):
        messages = template_messages(messages, detect_format(tokenizer.chat_template if tokenizer else None))
    return messages


@dataclass
class ToolUse:
    fmt: ToolFormat
    tools: list[dict]  # OpenAI's tool objects, for the template
    constraint: Constraint | None  # the forced call's grammar (tool_choice required or named)
    parallel: bool = True  # false: an answer's first call only, whatever else the model wrote

    @classmethod
    def of(cls, request: InferenceRequest, tokenizer: Tokenizer | None) -> ToolUse | None:
        """None when the request has no tools, or tool_choice "none" (the template then never sees them,
        so the model cannot call one); errors.Invalid when this model cannot serve them, saying why."""
        if not request.tools or request.tool_choice == "none":
            return None
        template = tokenizer.chat_template if tokenizer is not None else None
        fmt = detect_format(template)
        if fmt is None or tokenizer is None:
            raise errors.Invalid(f"tools cannot be used with {request.model}: {unsupported_reason(template)}")
        if request.sampling.response_format is not None and request.tool_choice in (None, "auto"):
            raise errors.Invalid(
                "response_format with tools and tool_choice auto is not supported: the format's grammar "
                "would keep the model from writing a tool call; send tool_choice none (an answer in "
                "the format), required or a named function (a call), or leave response_format out"
            )
        tools = [t.model_dump(exclude_none=True) for t in request.tools]
        choice = request.tool_choice.model_dump() if hasattr(request.tool_choice, "model_dump") else request.tool_choice
        try:
            grammar = fmt.grammar(
                tools,
                choice,
                request.parallel_tool_calls is not False,
                marker_tokens=fmt.marker_tokens(tokenizer.token_to_id),
            )
        except GrammarError as exc:
            raise errors.Invalid(exc.reason) from None
        return cls(
            fmt, tools, Constraint("grammar", grammar) if grammar else None, request.parallel_tool_calls is not False
        )

    def params(self, params: SamplingParams) -> SamplingParams:
        """Special tokens stay in the text (Llama's <|python_tag|> and Mistral's [TOOL_CALLS] are the
        markers the parser looks for); a forced call replaces any response_format."""
        return dataclasses.replace(params, skip_special_tokens=False, constraint=self.constraint or params.constraint)

    def parse(self, text: str, finish_reason: FinishReason) -> tuple[str, list[ToolCall] | None, FinishReason]:
        """A whole choice: its content, its calls, and finish_reason ``tool_calls`` when it made one
        and was not cut short."""
        parsed = self.fmt.parse(text)
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.tool_calls[: None if self.parallel else 1]
        ]
        return parsed.content or "", calls or None, _finish(finish_reason, bool(calls))

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self.fmt.stream_parser(), max_calls=None if self.parallel else 1)


@dataclass
class ChoiceStream:
    """One streamed choice: text deltas in, (content, tool-call deltas) out."""

    parser: StreamParser
    max_calls: int | None = None
    called: bool = False

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCallDelta] | None]:
        deltas = self.parser.feed(text) + (self.parser.finish() if finished else [])
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        calls = [
            ToolCallDelta(
                index=d.index,
                id=d.id,
                type="function" if d.id else None,
                function=FunctionDelta(name=d.name, arguments=d.arguments),
            )
            for d in deltas
            if isinstance(d, ParsedDelta) and (self.max_calls is None or d.index < self.max_calls)
        ]
        self.called = self.called or bool(calls)
        return content, calls or None

    def finish_reason(self, reason: FinishReason) -> FinishReason:
        return _finish(reason, self.called)


def _finish(reason: FinishReason, called: bool) -> FinishReason:
    return "tool_calls" if called and reason == "stop" else reason
