"""OpenAI request bodies, validated strictly (an unknown or unsupported field is a 400 that names it,
never silently ignored), and their translation into Strata's ``InferenceRequest``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared import errors
from shared.catalog import parse_ref
from shared.inference import MAX_N, ChatMessage, InferenceRequest, SamplingOptions
from shared.structured import MAX_TOOLS, ResponseFormat, Tool, ToolCall, ToolChoice, check_tools

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class OpenAIChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> OpenAIChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_strata(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content,
                           tool_calls=self.tool_calls or None, tool_call_id=self.tool_call_id)


class _Common(BaseModel):
    """What chat and completion requests share. ``top_k`` is an accepted extension (vLLM does too)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    cap_max_tokens: bool = Field(default=False, description=(
        "a Strata extension: true lowers max_tokens to what the model's context leaves after the prompt; false "
        "(OpenAI's behaviour) refuses a prompt plus max_tokens over the context with 400 context_length_exceeded"))
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, description="extension (vLLM): 1 is off")
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=1024, description="token id -> bias in [-100, 100]"
    )
    min_p: float | None = Field(default=None, ge=0, le=1, description="extension (vLLM)")
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        try:
            parse_ref(value)
        except errors.Invalid as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("n")
    @classmethod
    def _choices(cls, value: int) -> int:
        if value > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}: send several requests for more choices")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isascii() or not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            logprobs=logprobs,
            cap_max_tokens=self.cap_max_tokens,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            n=self.n,
            logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
            response_format=self.response_format
            if self.response_format and self.response_format.type != "text"
            else None,
        )


class ChatCompletionRequest(_Common):
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        check_tools(self.tools, self.tool_choice)
        return self

    def to_inference(self, request_id: str) -> InferenceRequest:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return InferenceRequest(
            request_id=request_id,
            model=self.model,
            messages=[m.to_strata() for m in self.messages],
            sampling=self._sampling(max_tokens, logprobs),
            stream=self.stream,
            tools=self.tools or None,
            tool_choice=self.tool_choice if self.tools else None,
            parallel_tool_calls=self.parallel_tool_calls if self.tools else None,
        )


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, description="OpenAI's default is 16")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = Field(default=False, description="the prompt before the completion (not with logprobs)")
    suffix: str | None = Field(default=None, description="refused: no insertion (fill-in-the-middle) mode")
    best_of: int | None = Field(default=None, ge=1, description="refused above 1")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported: there is no insertion (fill-in-the-middle) mode")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError("best_of above 1 is not supported: nothing ranks candidates; send several requests")
        return value

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo with logprobs is not supported: the prompt tokens' logprobs are not computed; "
                "send echo or logprobs"
            )
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def to_inference(self, request_id: str) -> InferenceRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return InferenceRequest(
            request_id=request_id,
            model=self.model,
            prompt=prompt,
            sampling=self._sampling(self.max_tokens, self.logprobs),
            stream=self.stream,
        )
