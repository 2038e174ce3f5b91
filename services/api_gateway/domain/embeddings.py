"""``POST /v1/embeddings`` in OpenAI's shapes: the request, validated strictly (an unknown field is a
400 that names it), its translation into Strata's ``EmbeddingRequest`` (shared/embeddings.py), and the
response built from the worker's vectors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared import errors
from shared.catalog import parse_ref
from shared.embeddings import MAX_INPUTS, EmbeddingRequest, Embeddings, decode_vector

from services.api_gateway.domain.responses import fingerprint

# Special tokens a text's bytes do not show (BOS, an embedder's end token): the reservation's bound
# per text input, as domain/quotas.py bounds a prompt.
INPUT_FRAME_TOKENS = 8


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(description=(
        f"a text, a list of texts, a list of token ids, or a list of token-id lists; at most {MAX_INPUTS} inputs, "
        "none empty, each within the model's context"))
    encoding_format: Literal["float", "base64"] = Field(default="float", description=(
        "base64: each vector as the base64 of its float32 little-endian components"))
    dimensions: int | None = Field(default=None, ge=1, description=(
        "keep the first N components and renormalise (Matryoshka); at most the model's hidden size"))
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        try:
            parse_ref(value)  # a malformed reference is a 400 here, not a worker's answer
        except errors.Invalid as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("input")
    @classmethod
    def _inputs(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items:
            raise ValueError("input must not be empty: give a text, a list of texts or token ids")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}: send several requests")
        for i, item in enumerate(items):
            if len(item) == 0:
                raise ValueError(f"input {i} is empty: every input needs at least one character or token")
            if not isinstance(item, str) and min(item) < 0:
                raise ValueError(f"input {i} has a negative token id")
        return value

    def inputs(self) -> list[str | list[int]]:
        """One list of inputs, however ``input`` was given."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]  # type: ignore[list-item]
        return list(value)  # type: ignore[arg-type]

    def token_bound(self) -> int:
        """An upper bound on the tokens it embeds, for a quota's reservation (see domain/quotas.py)."""
        return sum(len(x.encode()) + INPUT_FRAME_TOKENS if isinstance(x, str) else len(x) for x in self.inputs())

    def to_strata(self, request_id: str, api_key_id: str | None, client_request_id: str | None) -> EmbeddingRequest:
        return EmbeddingRequest(
            request_id=request_id,
            model=self.model,
            inputs=self.inputs(),
            dimensions=self.dimensions,
            api_key_id=api_key_id,
            client_request_id=client_request_id,
        )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage
    system_fingerprint: str | None = Field(
        default=None, description="the model version that answered: NAME:VERSION/DIGEST"
    )


def render(result: Embeddings, model: str, encoding_format: str) -> EmbeddingsResponse:
    data = [
        Embedding(index=i, embedding=v if encoding_format == "base64" else decode_vector(v))
        for i, v in enumerate(result.vectors)
    ]
    tokens = result.reply.prompt_tokens
    return EmbeddingsResponse(
        data=data,
        model=model,
        usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
        system_fingerprint=fingerprint(result.reply.model),
    )
