"""The serving contract (shared/inference.py) as AsyncAPI channels in the inference-worker's /asyncapi.json.

The worker subscribes to ``infer.request.<model>`` and pulls ``infer.jobs.<model>`` with nats-py
directly (those subscriptions come and go with its deployments), so FastStream, which writes the rest
of the document from the subscribers and publishers declared on its broker, never sees them. This adds
them, with schemas generated from the pydantic models the worker validates with, so that a program in
any language can take the message shapes from AsyncAPI (README, "Over NATS")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter

from shared import subjects
from shared.inference import (InferenceCancel, InferenceReply, InferenceRequest, StreamMessage)
from shared.rpc import RpcReply

REF = "#/components/schemas/{model}"


class InferenceResult(RpcReply):
    """The one reply to a request with ``stream`` false, and a job's result on ``infer.results.<request id>``:
    ``ok`` with an ``InferenceReply``, or ``ok`` false with a typed ``error`` (code, message)."""

    result: InferenceReply | None = None


MESSAGES: dict[str, tuple[Any, Literal["validation", "serialization"]]] = {
    # what a client sends is documented as the worker validates it; what the worker sends, as it writes it
    "InferenceRequest": (InferenceRequest, "validation"),
    "InferenceCancel": (InferenceCancel, "validation"),
    "InferenceResult": (InferenceResult, "serialization"),
    "StreamMessage": (StreamMessage, "serialization"),
}
TOKEN = ("one subject token: '.', '*', '>', '%' and whitespace are written %XX (their hex code), so "
         "qwen2.5-0.5b is qwen2%2E5-0.5b")


@dataclass(frozen=True)
class Channel:
    key: str
    address: str | None
    description: str
    messages: tuple[str, ...]
    action: Literal["send", "receive"]  # the worker's side
    parameters: tuple[str, ...] = ()
    reply: str | None = None  # the key of the channel the worker answers on


def _key(pattern: str) -> str:
    """A channel's key: its subject up to the first parameter (``infer.request.{model}``: ``infer.request``)."""
    return pattern.split(".{", 1)[0]


_REPLY = f"{_key(subjects.INFERENCE_REQUEST_PATTERN)}.reply"
CHANNELS = (
    Channel(
        _key(subjects.INFERENCE_REQUEST_PATTERN),
        subjects.INFERENCE_REQUEST_PATTERN,
        "A NATS request (request-reply) to the workers that serve "
        "the model (a queue group per model). No responders: the model is not deployed. api_key_id and "
        "client_request_id are refused here (403): a request naming an API key goes on "
        "infer.request.{model}.gateway, which only the api-gateway may publish to.",
        ("InferenceRequest",),
        "receive",
        ("model",),
        reply=_REPLY,
    ),
    Channel(
        _REPLY,
        None,
        "The requester's inbox: with stream false one InferenceResult (keepalive "
        "messages before it with keepalive true); with stream true started, chunks, then one end or error.",
        ("InferenceResult", "StreamMessage"),
        "send",
    ),
    Channel(
        _key(subjects.INFERENCE_JOB_PATTERN),
        subjects.INFERENCE_JOB_PATTERN,
        "A batch job: a JetStream publish into the JOBS stream (Nats-Msg-Id: "
        "the request id). Set request_id: the result is stored under it.",
        ("InferenceRequest",),
        "receive",
        ("model",),
    ),
    Channel(
        _key(subjects.INFERENCE_RESULT_PATTERN),
        subjects.INFERENCE_RESULT_PATTERN,
        "A job's result, kept a day in the RESULTS stream: read it "
        "with a consumer filtered to this subject, or the stream's last message on it.",
        ("InferenceResult",),
        "send",
        ("request_id",),
    ),
    Channel(subjects.CANCEL, subjects.CANCEL, "Stops a request wherever it runs.", ("InferenceCancel",), "receive"),
)
PARAMETERS = {
    "model": f"the model's name (not NAME:VERSION), as {TOKEN}",
    "request_id": f"the job's request_id, as {TOKEN}",
}


def schemas() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each message's payload schema (a $ref or an inline union) and the definitions they refer to."""
    keyed = [(name, mode, TypeAdapter(tp)) for name, (tp, mode) in MESSAGES.items()]
    top, defs = TypeAdapter.json_schemas(keyed, ref_template=REF)
    return {name: top[(name, mode)] for name, (_, mode) in MESSAGES.items()}, defs.get("$defs", {})


def add_serving_channels(doc: dict[str, Any], service: str) -> None:
    """Add the serving channels, operations, messages and schemas to an AsyncAPI 3 document."""
    payloads, defs = schemas()
    components = doc.setdefault("components", {})
    known = components.setdefault("schemas", {})
    for name, schema in defs.items():
        # FastStream may have put a model of the same name there (ModelId, from the events): the same model
        if known.setdefault(name, schema) != schema:
            raise ValueError(f"AsyncAPI schema {name!r} differs between FastStream and the serving contract")
    for name, payload in payloads.items():
        components.setdefault("messages", {})[f"serving:{name}"] = {"name": name, "title": name, "payload": payload}
    replies = {c.reply for c in CHANNELS}
    for ch in CHANNELS:
        key = f"{service}:{ch.key}"
        doc.setdefault("channels", {})[key] = {
            "address": ch.address,
            "description": ch.description,
            "messages": {m: {"$ref": f"#/components/messages/serving:{m}"} for m in ch.messages},
            **({"parameters": {p: {"description": PARAMETERS[p]} for p in ch.parameters}} if ch.parameters else {}),
        }
        if ch.key in replies:  # described by the reply of the operation it answers
            continue
        operation: dict[str, Any] = {
            "action": ch.action,
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{m}"} for m in ch.messages],
        }
        if ch.reply:
            reply = next(c for c in CHANNELS if c.key == ch.reply)
            operation["reply"] = {
                "address": {"location": "$message.header#/reply_to"},
                "channel": {"$ref": f"#/channels/{service}:{reply.key}"},
                "messages": [{"$ref": f"#/channels/{service}:{reply.key}/messages/{m}"} for m in reply.messages],
            }
        doc.setdefault("operations", {})[key] = operation
