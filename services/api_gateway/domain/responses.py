"""OpenAI response bodies (non-stream objects, stream chunks, errors, the model list), built from the
serving contract's messages. Field names and shapes follow OpenAI's API exactly, so its clients parse them."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.events import ModelId
from shared.inference import FinishReason, TokenLogprob, Usage
from shared.structured import ToolCall, ToolCallDelta


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> OpenAIUsage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


# -- logprobs ------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


def chat_logprobs(items: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if items is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[_top(s, lp) for s, lp in t.top],
            )
            for t in items
        ]
    )


def completion_logprobs(items: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    if items is None:
        return None
    offsets, at = [], offset
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[dict(t.top) for t in items],
        text_offset=offsets,
    )


OpenAIFinish = Literal["stop", "length", "tool_calls"]


def openai_finish(reason: FinishReason) -> OpenAIFinish:
    """OpenAI knows stop, length and tool_calls; a cancelled request that still answers ended at the caller's wish."""
    return reason if reason in ("length", "tool_calls") else "stop"  # type: ignore[return-value]


# -- non-stream objects ----------------------------------------------------------------------------
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinish


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: OpenAIUsage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


# -- stream chunks ---------------------------------------------------------------------------------
class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinish | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: OpenAIUsage | None = None


# -- models and errors -----------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "strata"
    max_model_len: int | None = Field(
        default=None,
        description=(
            "the most tokens (prompt plus completion) one request may hold, as vLLM names it; None if no worker said"
        ),
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def now() -> int:
    return int(time.time())


def fingerprint(model: ModelId | None) -> str | None:
    """The manifest digest of the model version that answered: which exact weights produced this."""
    return None if model is None else f"{model.name}:{model.version}/{model.digest}"


def sse(body: BaseModel | dict[str, Any]) -> bytes:
    payload = body.model_dump_json(exclude_none=False) if isinstance(body, BaseModel) else _json(body)
    return f"data: {payload}\n\n".encode()


def _json(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body, separators=(",", ":"))


SSE_DONE = b"data: [DONE]\n\n"
