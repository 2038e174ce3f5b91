"""Turning the contract's messages into OpenAI objects: a whole ``InferenceReply`` into a
``chat.completion`` / ``text_completion``, and a stream of ``Started``/``Chunk``/``End`` into
server-sent events, chunk by chunk. Plain functions: no NATS, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.events import ModelId
from shared.inference import Choice, Chunk, End, InferenceReply, Started

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


def _choices(reply: InferenceReply) -> list[Choice]:
    return reply.choices or [
        Choice(
            index=0,
            text=reply.text,
            finish_reason=reply.finish_reason,
            logprobs=reply.logprobs,
            tool_calls=reply.tool_calls,
        )
    ]


def _message(choice: Choice) -> AssistantMessage:
    """With tool calls and nothing else said, content is null, as OpenAI sends it."""
    content = None if choice.tool_calls and not choice.text else choice.text
    return AssistantMessage(content=content, tool_calls=choice.tool_calls)


def chat_completion(reply: InferenceReply, model: str) -> ChatCompletion:
    return ChatCompletion(
        id=chat_id(reply.request_id),
        created=now(),
        model=model,
        system_fingerprint=fingerprint(reply.model),
        choices=[
            ChatChoice(
                index=c.index,
                message=_message(c),
                logprobs=chat_logprobs(c.logprobs),
                finish_reason=openai_finish(c.finish_reason),
            )
            for c in _choices(reply)
        ],
        usage=OpenAIUsage.of(reply.usage),
    )


def text_completion(reply: InferenceReply, model: str, echo: str = "") -> Completion:
    """``echo``: the prompt, when the caller asked for it before the completion."""
    return Completion(
        id=completion_id(reply.request_id),
        created=now(),
        model=model,
        system_fingerprint=fingerprint(reply.model),
        choices=[
            CompletionChoice(
                index=c.index,
                text=echo + c.text,
                logprobs=completion_logprobs(c.logprobs),
                finish_reason=openai_finish(c.finish_reason),
            )
            for c in _choices(reply)
        ],
        usage=OpenAIUsage.of(reply.usage),
    )


@dataclass
class SseStream:
    """Renders one request's stream as OpenAI chunks. ``chat`` picks ``chat.completion.chunk`` (with a
    role delta first) over ``text_completion`` chunks; ``include_usage`` adds the final usage chunk;
    ``echo`` (completions) is sent as the first chunk. With ``n`` choices each chunk names its choice's
    index, and each choice ends with its own finish_reason."""

    request_id: str
    model: str
    chat: bool
    include_usage: bool = False
    created: int = field(default_factory=now)
    served_by: ModelId | None = None
    n: int = 1
    echo: str = ""
    text_offsets: dict[int, int] = field(default_factory=dict)

    def render(self, message: Started | Chunk | End) -> bytes:
        if isinstance(message, Started):
            self.served_by = message.model
            if self.chat:
                return b"".join(sse(self._chat_chunk(Delta(role="assistant", content=""), i)) for i in range(self.n))
            return (
                b"".join(
                    self._content(Chunk(request_id=self.request_id, index=0, text=self.echo, choice=i))
                    for i in range(self.n)
                )
                if self.echo
                else b""
            )
        if isinstance(message, Chunk):
            return self._content(message)
        return self._end(message)

    def error(self, body: ErrorBody) -> bytes:
        """A failure after the first bytes went out: OpenAI's clients raise on an ``error`` event."""
        return sse(body)

    def _content(self, chunk: Chunk) -> bytes:
        if self.chat:
            delta = Delta(
                content=chunk.text if chunk.text or not chunk.tool_calls else None, tool_calls=chunk.tool_calls
            )
            return sse(self._chat_chunk(delta, chunk.choice, logprobs=chat_logprobs(chunk.logprobs)))
        offset = self.text_offsets.get(chunk.choice, 0)
        body = self._completion_chunk(chunk.text, chunk.choice, None, completion_logprobs(chunk.logprobs, offset))
        self.text_offsets[chunk.choice] = offset + len(chunk.text)
        return sse(body)

    def _end(self, end: End) -> bytes:
        ends = [(c.index, c.finish_reason) for c in end.choices] if end.choices else [(0, end.finish_reason)]
        out = b""
        for index, reason in ends:
            finish = openai_finish(reason)
            out += sse(
                self._chat_chunk(Delta(), index, finish=finish)
                if self.chat
                else self._completion_chunk("", index, finish, None)
            )
        if self.include_usage:
            usage = OpenAIUsage.of(end.usage)
            if self.chat:
                out += sse(
                    ChatCompletionChunk(
                        id=chat_id(self.request_id),
                        created=self.created,
                        model=self.model,
                        system_fingerprint=fingerprint(self.served_by),
                        choices=[],
                        usage=usage,
                    )
                )
            else:
                out += sse(
                    Completion(
                        id=completion_id(self.request_id),
                        created=self.created,
                        model=self.model,
                        system_fingerprint=fingerprint(self.served_by),
                        choices=[],
                        usage=usage,
                    )
                )
        return out + SSE_DONE

    def _chat_chunk(self, delta: Delta, index: int, *, finish: str | None = None, logprobs=None) -> ChatCompletionChunk:  # type: ignore[no-untyped-def]
        return ChatCompletionChunk(
            id=chat_id(self.request_id),
            created=self.created,
            model=self.model,
            system_fingerprint=fingerprint(self.served_by),
            choices=[ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)],  # type: ignore[arg-type]
        )

    def _completion_chunk(self, text: str, index: int, finish: str | None, logprobs) -> Completion:  # type: ignore[no-untyped-def]
        return Completion(
            id=completion_id(self.request_id),
            created=self.created,
            model=self.model,
            system_fingerprint=fingerprint(self.served_by),
            choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)],  # type: ignore[arg-type]
        )
