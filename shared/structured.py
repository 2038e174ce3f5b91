"""Structured outputs and tool calls in the serving contract, in OpenAI's shapes (the gateway passes them
through; NATS users send the same JSON): ``response_format``, ``tools``/``tool_choice``, and the
``tool_calls`` an assistant message or a reply carries. Workers enforce formats with a grammar
(services/inference_worker/engine/guided.py) and parse tool calls in the model's own syntax."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer,
                      model_validator)

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
MAX_TOOLS = 128  # OpenAI's limit


def _json_object(value: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    """A JSON-schema dict must survive JSON (it travels as JSON, and the grammar compiler reads JSON)."""
    if value is not None:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} is not JSON: {exc}") from None
    return value


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description=(
        "a JSON Schema; none means any JSON object"))
    strict: bool | None = Field(default=None, description=(
        "accepted; the schema is enforced by the grammar whether or not it is set"))

    @field_validator("schema_")
    @classmethod
    def _schema_is_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _json_object(value, "json_schema.schema")


class ResponseFormat(BaseModel):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (valid against it)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format needs json_schema exactly when its type is json_schema")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the output must match: None for text."""
        if self.type == "text":
            return None
        if self.json_schema is None or self.json_schema.schema_ is None:
            return {"type": "object"}
        return self.json_schema.schema_


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON Schema of the arguments object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f"function.parameters must be an object schema (a call's arguments are an object), "
                             f"got type {value.get('type')!r}")
        return _json_object(value, "function.parameters")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = Field(description="a JSON object, as text (OpenAI's shape)")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class _WithoutNulls(BaseModel):
    """Unset fields are left out, not sent as null: OpenAI's stream omits them, and its SDK's stream
    accumulator would copy a null ``type`` over the call's "function"."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_WithoutNulls):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(_WithoutNulls):
    """One entry of a streamed ``delta.tool_calls``, as OpenAI streams it: a call's first delta has its id,
    type and function name (arguments ""), later ones only its index and the next piece of arguments."""

    index: int = Field(ge=0)
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


def check_tools(tools: list[Tool] | None, tool_choice: ToolChoice | None) -> None:
    """What OpenAI refuses too: duplicate function names, and a named or required choice without tools."""
    names = [t.function.name for t in tools or []]
    if len(set(names)) != len(names):
        raise ValueError("tools must have distinct function names")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise ValueError(f"tool_choice names the function {tool_choice.function.name!r}, which is not in tools")
    if tool_choice == "required" and not names:
        raise ValueError("tool_choice 'required' needs tools")
