"""The serving contract between clients (api-gateway, CLI, users) and inference-workers.

Interactive requests: a client sends an ``InferenceRequest`` as a NATS request on
``infer.request.<model name>`` (``subjects.inference_request``); the workers that host the model
share that subject through one queue group per model. With ``stream: false`` the one reply is a
``shared.rpc.RpcReply`` whose result is an ``InferenceReply`` (or whose error is typed); with
``keepalive: true`` as well, ``keepalive`` messages (below) come before it while the request waits
or runs. With ``stream: true`` the worker publishes ``StreamMessage``s to the reply
inbox: ``started``, then ``chunk``s, then exactly one ``end`` (usage, finish reason) or ``error``;
while a request waits in the queue or between tokens the worker sends ``keepalive`` at least every
``KEEPALIVE_S`` seconds, so a client that hears nothing for ``SILENCE_TIMEOUT_S`` knows the worker
died and fails the request instead of hanging. No responder at all means the model is not deployed:
the client gets that at once (``NoRespondersError``), not after a time-out.

Cancelling: publish an ``InferenceCancel`` on ``infer.cancel`` (every worker listens; the one that
holds the request stops it and frees its cache blocks).

Batch jobs: an ``InferenceRequest`` published to the JetStream subject ``infer.jobs.<model name>``
(stream ``JOBS``) is processed at least once; its reply, an ``RpcReply`` as for a non-stream
request (result ``InferenceReply``, or a typed error), is published to
``infer.results.<request id>`` (stream ``RESULTS``), and a duplicate request id gives one result
(see shared/inference_jobs.py).
Outputs never go into the ``EVENTS`` stream (the audit log): the ``inference.completed`` event carries
their sha256 only, and a salted commitment to the prompt whose salt goes only to the requester, in
``InferenceReply.prompt_salt`` / ``Started.prompt_salt`` (shared/prompt_commitment.py).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer,
                      model_validator)

from shared import subjects
from shared.events import ModelId, new_id
from shared.prompt_commitment import SALT_PATTERN, prompt_bytes
from shared.structured import MAX_TOOLS, ResponseFormat, Tool, ToolCall, ToolCallDelta, ToolChoice, check_tools

MAX_N = 16  # choices per request
# SamplingOptions fields left out of the JSON while at their defaults (see its serializer)
WIRE_OPTIONAL = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "n",
                 "cap_max_tokens", "response_format")
# InferenceRequest fields left out while unset, for the same reason
REQUEST_WIRE_OPTIONAL = ("tools", "tool_choice", "parallel_tool_calls")
KEEPALIVE_S = 1.0
SILENCE_TIMEOUT_S = 10.0
CANCEL_SUBJECT = subjects.CANCEL
JOBS_STREAM, RESULTS_STREAM = subjects.JOBS_STREAM, subjects.RESULTS_STREAM


class _OptionalOnWire(BaseModel):
    """Fields added after the first release travel only when they differ from their default: a peer from
    before them forbids unknown fields (or hands every key to a chat template), and would refuse or
    render differently what carried them. ``wire_optional`` names them."""

    wire_optional: ClassVar[tuple[str, ...]] = ()

    # unannotated return: the JSON schema (AsyncAPI) stays the model's own
    @model_serializer(mode="wrap")
    def _optional_only_when_set(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        for name in self.wire_optional:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data


class ChatMessage(_OptionalOnWire):
    wire_optional = ("tool_calls", "tool_call_id")  # a plain message keeps its two keys
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(default=None, description="none only on an assistant message that has tool_calls")
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant message's calls")
    tool_call_id: str | None = Field(default=None, max_length=128, description="a tool message: the call it answers")

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class SamplingOptions(_OptionalOnWire):
    """The engine's sampling parameters. Unset values take the model's generation_config.json."""

    wire_optional = WIRE_OPTIONAL
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="0 disables top-k")
    seed: int | None = None
    stop: list[str] = Field(default=[], max_length=16)
    stop_token_ids: list[int] = Field(default=[], max_length=64)
    logprobs: int | None = Field(default=None, ge=0, le=20, description="top-n alternatives per token")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="OpenAI's, over the generated tokens")
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="OpenAI's, over the generated tokens"
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description=("transformers'/vLLM's, over prompt and generated tokens: 1 is off, above 1 discourages repeats"),
    )
    logit_bias: dict[int, float] | None = Field(
        default=None,
        max_length=1024,
        description=(
            "token id -> bias in [-100, 100] added to its logit; an id outside the model's vocabulary is refused"
        ),
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="drop tokens below min_p x the top token's probability"
    )
    n: int = Field(
        default=1,
        ge=1,
        le=MAX_N,
        description=(
            "choices, sampled together in one batch; choice 0 uses ``seed``, choice i > 0 a seed derived from it and i"
        ),
    )
    cap_max_tokens: bool = Field(
        default=False,
        description=(
            "false: a prompt plus max_tokens over the model's context is refused (context_length_exceeded); "
            "true: max_tokens is lowered to what the context leaves after the prompt"
        ),
    )
    response_format: ResponseFormat | None = Field(
        default=None, description=("OpenAI's: json_object or json_schema output, enforced token by token by a grammar")
    )

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        return value


class Attribution:
    """api_key_id and client_request_id: which API key asked, and the caller's own id. The api-gateway
    sets them, and only its subjects may carry them (subjects.ATTRIBUTED)."""

    ATTRIBUTION_FIELDS = ("api_key_id", "client_request_id")

    def claimed_attribution(self) -> str | None:
        """The first attribution field set, None when the request names no key."""
        return next((f for f in self.ATTRIBUTION_FIELDS if getattr(self, f) is not None), None)

    @property
    def attributed(self) -> bool:
        return self.claimed_attribution() is not None


class InferenceRequest(Attribution, _OptionalOnWire):
    wire_optional = REQUEST_WIRE_OPTIONAL
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    model: str = Field(min_length=1, description="NAME, NAME:VERSION or NAME@ALIAS")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    sampling: SamplingOptions = SamplingOptions()
    stream: bool = False
    keepalive: bool = Field(
        default=False,
        description="with stream false: keepalive messages before the one reply, "
        "at least every KEEPALIVE_S, so the caller can tell a dead worker from a long answer",
    )
    api_key_id: str | None = Field(
        default=None,
        max_length=64,
        description="set by the gateway: the public id of the caller's API key, copied into inference.completed",
    )
    client_request_id: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "set by the gateway: the caller's own id (its x-request-id header), copied into inference.completed for "
            "correlation only; ``request_id`` is always made by the gateway, so two callers can never share one"
        ),
    )
    tools: list[Tool] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TOOLS,
        description=("OpenAI's: functions the model may call (chat only; rendered by the model's chat template)"),
    )
    tool_choice: ToolChoice | None = Field(
        default=None,
        description=(
            "auto (the default with tools), none, required, or a named function; "
            "required and named are enforced by a grammar"
        ),
    )
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call per answer")

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) or 'prompt' (completion)")
        if self.tools and self.prompt is not None:
            raise ValueError("tools need 'messages': a completion prompt has no chat template to render them")
        check_tools(self.tools, self.tool_choice)
        return self

    def prompt_bytes(self) -> bytes:
        """What the event's prompt commitment covers (shared/prompt_commitment.py)."""
        return prompt_bytes(
            prompt=self.prompt,
            messages=[m.model_dump() for m in self.messages] if self.messages else None,
            tools=[t.model_dump(exclude_none=True) for t in self.tools]
            if self.tools and self.tool_choice != "none"
            else None,
        )  # "none": never in the prompt


PromptSalt = Field(
    default=None,
    pattern=SALT_PATTERN,
    description="the salt of this request's prompt commitment in "
    "inference.completed: for the requester alone, to verify its receipt (None from a worker before #19)",
)


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]] = []


FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


class Choice(BaseModel):
    """One of a request's ``n`` choices."""

    index: int = Field(ge=0)
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


class InferenceReply(BaseModel):
    """``text``, ``finish_reason``, ``logprobs`` and ``tool_calls`` are choice 0's; with ``n`` > 1,
    ``choices`` has every choice (choice 0 too), and ``usage.completion_tokens`` counts the tokens of all
    of them. With ``tools``, ``text`` is the content outside the model's tool calls, which are parsed into
    ``tool_calls`` (finish_reason ``tool_calls``)."""

    request_id: str
    model: ModelId
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_salt: str | None = PromptSalt
    choices: list[Choice] | None = None
    tool_calls: list[ToolCall] | None = None


class InferenceError(BaseModel):
    """A typed failure: ``code`` is one of shared.errors' codes (not_found, invalid, unavailable…)."""

    request_id: str
    code: str
    message: str


class Started(BaseModel):
    kind: Literal["started"] = "started"
    request_id: str
    model: ModelId
    prompt_salt: str | None = PromptSalt  # here, not in ``end``: a gateway sends its headers before the first token


class Chunk(BaseModel):
    kind: Literal["chunk"] = "chunk"
    request_id: str
    index: int = Field(ge=0)
    text: str
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    choice: int = Field(default=0, ge=0, description="which of the request's n choices this text belongs to")
    tool_calls: list[ToolCallDelta] | None = Field(
        default=None,
        description=(
            "with tools: the pieces of the model's tool calls in this chunk (``text`` is then only the content)"
        ),
    )


class ChoiceEnd(BaseModel):
    index: int = Field(ge=0)
    finish_reason: FinishReason


class End(BaseModel):
    """Sent once all choices ended: ``finish_reason`` is choice 0's, ``choices`` (n > 1) each one's,
    ``usage.completion_tokens`` the tokens of all of them."""

    kind: Literal["end"] = "end"
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    choices: list[ChoiceEnd] | None = None


class StreamFailure(BaseModel):
    kind: Literal["error"] = "error"
    error: InferenceError


class Keepalive(BaseModel):
    kind: Literal["keepalive"] = "keepalive"
    request_id: str


StreamMessage = Annotated[Started | Chunk | End | StreamFailure | Keepalive, Field(discriminator="kind")]


class InferenceCancel(BaseModel):
    request_id: str
    reason: str = "cancelled by the client"


class LoadedModelsRequest(BaseModel):
    """The body of ``rpc.inference-worker.models`` (no queue group: every worker answers; gather the
    replies, each an ``RpcReply`` whose result is a ``LoadedModels``, for a short window)."""


class LoadedDeployment(BaseModel):
    deployment_id: str
    replica: int = 0
    model: ModelId
    aliases: list[str] = []
    device: str
    state: Literal["loading", "ready", "draining", "failed"]
    requests_in_flight: int = 0
    reason: str | None = Field(default=None, description="why the load failed (state 'failed')")
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description=(
            "the most tokens (prompt plus completion) one request may hold; "
            "None from a worker before #18, or while loading"
        ),
    )
    runtime: str | None = Field(
        default=None, description="strata-engine or llama.cpp; None from a worker before #17, or while loading"
    )
    on_demand: bool = Field(default=False, description="loaded by requests, unloaded after keep_alive_s idle")
    loaded: bool = Field(default=True, description="whether its weights are in memory (False: on-demand, unloaded)")
    keep_alive_s: float | None = Field(default=None, ge=0, description="on-demand: idle seconds before unloading")


class LoadedModels(BaseModel):
    node_id: str
    deployments: list[LoadedDeployment]
