"""Turning the contract's messages into OpenAI objects: a whole ``InferenceReply`` into a
``chat.completion`` / ``text_completion``, and a stream of ``Started``/``Chunk``/``End`` into
server-sent events, chunk by chunk. Plain functions: no NATS, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.events import ModelId
from shared.inference import Chunk, End, InferenceReply, Started

from services.api_gateway.domain.responses import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    ErrorBody,
    OpenAIUsage,
    chat_logprobs,
    completion_logprobs,
    fingerprint,
    now,
    openai_finish,
    sse,
)


def chat_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def chat_completion(reply: InferenceReply, model: str) -> ChatCompletion:
    return ChatCompletion(
        id=chat_id(reply.request_id), created=now(), model=model, system_fingerprint=fingerprint(reply.model),
        choices=[ChatChoice(message=AssistantMessage(content=reply.text), logprobs=chat_logprobs(reply.logprobs),
                            finish_reason=openai_finish(reply.finish_reason))],
        usage=OpenAIUsage.of(reply.usage),
    )


def text_completion(reply: InferenceReply, model: str, echo: str = "") -> Completion:
    """``echo``: the prompt, when the caller asked for it before the completion."""
    return Completion(
        id=completion_id(reply.request_id), created=now(), model=model, system_fingerprint=fingerprint(reply.model),
        choices=[CompletionChoice(text=echo + reply.text, logprobs=completion_logprobs(reply.logprobs),
                                  finish_reason=openai_finish(reply.finish_reason))],
        usage=OpenAIUsage.of(reply.usage),
    )


@dataclass
class SseStream:
    """Renders one request's stream as OpenAI chunks. ``chat`` picks ``chat.completion.chunk`` (with a
    role delta first) over ``text_completion`` chunks; ``include_usage`` adds the final usage chunk;
    ``echo`` (completions) is sent as the first chunk."""

    request_id: str
    model: str
    chat: bool
    include_usage: bool = False
    created: int = field(default_factory=now)
    served_by: ModelId | None = None
    text_offset: int = 0
    echo: str = ""

    def render(self, message: Started | Chunk | End) -> bytes:
        if isinstance(message, Started):
            self.served_by = message.model
            if self.chat:
                return sse(self._chat_chunk(Delta(role="assistant", content="")))
            return self._content(Chunk(request_id=self.request_id, index=0, text=self.echo)) if self.echo else b""
        if isinstance(message, Chunk):
            return self._content(message)
        return self._end(message)

    def error(self, body: ErrorBody) -> bytes:
        """A failure after the first bytes went out: OpenAI's clients raise on an ``error`` event."""
        return sse(body)

    def _content(self, chunk: Chunk) -> bytes:
        if self.chat:
            return sse(self._chat_chunk(Delta(content=chunk.text), logprobs=chat_logprobs(chunk.logprobs)))
        body = self._completion_chunk(chunk.text, None, completion_logprobs(chunk.logprobs, self.text_offset))
        self.text_offset += len(chunk.text)
        return sse(body)

    def _end(self, end: End) -> bytes:
        finish = openai_finish(end.finish_reason)
        last = self._chat_chunk(Delta(), finish=finish) if self.chat else self._completion_chunk("", finish, None)
        out = sse(last)
        if self.include_usage:
            usage = OpenAIUsage.of(end.usage)
            if self.chat:
                out += sse(ChatCompletionChunk(id=chat_id(self.request_id), created=self.created, model=self.model,
                                               system_fingerprint=fingerprint(self.served_by), choices=[], usage=usage))
            else:
                out += sse(Completion(id=completion_id(self.request_id), created=self.created, model=self.model,
                                      system_fingerprint=fingerprint(self.served_by), choices=[], usage=usage))
        return out + SSE_DONE

    def _chat_chunk(self, delta: Delta, *, finish: str | None = None, logprobs=None) -> ChatCompletionChunk:  # type: ignore[no-untyped-def]
        return ChatCompletionChunk(
            id=chat_id(self.request_id), created=self.created, model=self.model, system_fingerprint=fingerprint(self.served_by),
            choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)],  # type: ignore[arg-type]
        )

    def _completion_chunk(self, text: str, finish: str | None, logprobs) -> Completion:  # type: ignore[no-untyped-def]
        return Completion(
            id=completion_id(self.request_id), created=self.created, model=self.model,
            system_fingerprint=fingerprint(self.served_by),
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],  # type: ignore[arg-type]
        )
