"""The embeddings contract between clients (api-gateway, CLI, users) and inference-workers (#18).

A client sends an ``EmbeddingRequest`` as a NATS request on ``infer.embed.<model name>``
(``subjects.embedding_request``); the workers that host the model share it through one queue group
per model, as they share ``infer.request.<model>``. The worker answers on the reply inbox with
``keepalive`` messages (shared/inference.py) at least every ``KEEPALIVE_S`` while the request waits
or runs, then the vectors in ``EmbeddingPart`` messages (each well under NATS' 1 MB ``max_payload``:
2048 vectors of 4096 floats are 44 MB as base64), then one ``shared.rpc.RpcReply`` whose result is
an ``EmbeddingReply`` (usage, dimensions, the prompt salt), or whose error is typed. No responder at
all means the model is not deployed.

A vector travels as OpenAI's ``encoding_format: base64`` writes it: the base64 of its float32
components, little-endian. The worker publishes ``inference.embedded`` (shared/events.py) with a
salted commitment to the inputs (``input_bytes``) and the sha256 of the vectors it returned
(``vectors_sha256``), so a receipt proves what embedded what without carrying either.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Literal

import numpy as np
from nats.aio.client import Client
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import errors, subjects
from shared.catalog import parse_ref
from shared.events import ModelId, new_id
from shared.inference import SILENCE_TIMEOUT_S, Attribution
from shared.inference_client import WorkerLost, _Call
from shared.prompt_commitment import SALT_PATTERN
from shared.rpc import ErrorBody, RpcReply

MAX_INPUTS = 2048  # OpenAI's limit per request
PART_BYTES = 256 * 1024  # base64 carried per EmbeddingPart


class EmbeddingRequest(Attribution, BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    model: str = Field(min_length=1, description="NAME, NAME:VERSION or NAME@ALIAS")
    inputs: list[str | list[int]] = Field(min_length=1, max_length=MAX_INPUTS,
                                          description="texts (tokenized by the model's tokenizer) or token-id lists")
    dimensions: int | None = Field(
        default=None, ge=1, description="Matryoshka: keep the first N components, renormalised"
    )
    api_key_id: str | None = Field(default=None, max_length=64, description="set by the gateway, copied into the event")
    client_request_id: str | None = Field(
        default=None, max_length=128, description="set by the gateway, correlation only"
    )

    def input_bytes(self) -> bytes:
        return input_bytes(self.inputs)


class EmbeddingPart(BaseModel):
    """Vectors ``start`` .. ``start + len(vectors) - 1`` of the request, in input order."""

    kind: Literal["embedding_part"] = "embedding_part"
    request_id: str
    start: int = Field(ge=0)
    vectors: list[str] = Field(description="each the base64 of float32 little-endian components")


class EmbeddingReply(BaseModel):
    """The last message (an RpcReply's result): what the vectors before it add up to."""

    request_id: str
    model: ModelId
    count: int = Field(ge=1)
    dimensions: int = Field(ge=1)
    pooling: str
    prompt_tokens: int = Field(ge=0)
    prompt_salt: str | None = Field(
        default=None,
        pattern=SALT_PATTERN,
        description="the salt of the inputs' commitment in inference.embedded: for the requester alone",
    )


class Embeddings(BaseModel):
    """What a client gets: the reply and the vectors, in input order."""

    reply: EmbeddingReply
    vectors: list[str]


def input_bytes(inputs: list[str | list[int]]) -> bytes:
    """What the event's commitment covers: the inputs as one JSON array, no whitespace, UTF-8
    (``["a","b"]``, ``[[1,2],[3]]``)."""
    return json.dumps(inputs, separators=(",", ":"), ensure_ascii=False).encode()


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def decode_vector(data: str) -> list[float]:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").tolist()


def vectors_sha256(vectors: list[str]) -> str:
    """sha256 of every returned vector's float32 little-endian bytes, in input order."""
    digest = hashlib.sha256()
    for v in vectors:
        digest.update(base64.b64decode(v))
    return digest.hexdigest()


def parts(request_id: str, vectors: list[str]) -> list[EmbeddingPart]:
    """The vectors cut into messages of about PART_BYTES (one vector at least each)."""
    out, start, size = [], 0, 0
    for i, v in enumerate(vectors):
        if i > start and size + len(v) > PART_BYTES:
            out.append(EmbeddingPart(request_id=request_id, start=start, vectors=vectors[start:i]))
            start, size = i, 0
        size += len(v)
    out.append(EmbeddingPart(request_id=request_id, start=start, vectors=vectors[start:]))
    return out


async def embed(
    nc: Client,
    request: EmbeddingRequest,
    *,
    silence_timeout_s: float = SILENCE_TIMEOUT_S,
    deadline_s: float | None = None,
) -> Embeddings:
    """Send ``request`` and gather the vectors and the reply. Raises the worker's typed error,
    ``NotFound`` when no worker serves the model, ``WorkerLost`` / ``DeadlineExceeded`` as
    ``inference_client.complete`` does."""
    vectors: list[str] = []
    subject = subjects.embedding_request(parse_ref(request.model).name, attributed=request.attributed)
    async with _Call(nc, request, silence_timeout_s, deadline_s, subject=subject) as call:  # type: ignore[arg-type]
        while True:
            data = await call.next()
            try:
                part = EmbeddingPart.model_validate_json(data)
            except ValidationError:
                part = None
            if part is not None:
                if part.start != len(vectors):
                    raise WorkerLost(f"the worker's vectors for {request.request_id} arrived out of order")
                vectors.extend(part.vectors)
                continue
            try:
                reply = RpcReply.model_validate_json(data)
            except ValidationError:
                continue  # a keepalive (or noise): the worker is alive
            call.finished = True
            if not reply.ok:
                error = reply.error or ErrorBody(code="internal", message="the worker failed without saying why")
                raise errors.from_code(error.code, error.message)
            try:
                result = EmbeddingReply.model_validate(reply.result)
            except ValidationError as exc:
                raise WorkerLost(
                    f"the worker's reply to {request.request_id} is malformed: {exc.errors()[0]['msg']}"
                ) from None
            if result.count != len(vectors):
                raise WorkerLost(
                    f"the worker sent {len(vectors)} vectors for {request.request_id} but says {result.count}"
                )
            return Embeddings(reply=result, vectors=vectors)


__all__ = [
    "MAX_INPUTS",
    "EmbeddingPart",
    "EmbeddingReply",
    "EmbeddingRequest",
    "Embeddings",
    "decode_vector",
    "embed",
    "encode_vector",
    "input_bytes",
    "parts",
    "vectors_sha256",
]
