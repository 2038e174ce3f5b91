"""The worker's /asyncapi.json documents the serving contract it serves with nats-py directly
(shared/serving_asyncapi.py): the channels, and schemas generated from the pydantic models."""

from __future__ import annotations

import jsonschema
import pytest

from shared.inference import InferenceReply, InferenceRequest, SamplingOptions, Usage
from shared.serving_asyncapi import REF, InferenceResult
from shared.service import load
from tests.support.helpers import settings_for


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    settings = settings_for("inference-worker", "nats://127.0.0.1:1", tmp_path_factory.mktemp("worker"))
    return load("inference-worker", settings).asyncapi()


def payload(doc: dict, channel: str, message: str) -> dict:
    """The payload schema of ``message`` on ``channel``, as a document whose refs resolve."""
    ref = doc["channels"][f"inference-worker:{channel}"]["messages"][message]["$ref"]
    name = ref.rsplit("/", 1)[1]
    return {**doc["components"]["messages"][name]["payload"], "components": doc["components"]}


def test_the_serving_channels_and_operations_are_documented(doc):
    addresses = {key: channel["address"] for key, channel in doc["channels"].items()}
    assert {k: v for k, v in addresses.items() if k.startswith("inference-worker:infer.")} == {
        "inference-worker:infer.request": "infer.request.{model}",
        "inference-worker:infer.request.reply": None,  # the requester's inbox
        "inference-worker:infer.jobs": "infer.jobs.{model}",
        "inference-worker:infer.results": "infer.results.{request_id}",
        "inference-worker:infer.cancel": "infer.cancel",
        # the rest of the worker's declared subscriptions (shared/contracts/inference.py), named by their subject
        "inference-worker:infer.request.{model}.gateway": "infer.request.{model}.gateway",
        "inference-worker:infer.embed.{model}": "infer.embed.{model}",
        "inference-worker:infer.embed.{model}.gateway": "infer.embed.{model}.gateway",
    }
    request = doc["operations"]["inference-worker:infer.request"]
    assert request["action"] == "receive"
    assert [m["$ref"].rsplit("/", 1)[1] for m in request["reply"]["messages"]] == ["InferenceResult", "StreamMessage"]
    assert doc["operations"]["inference-worker:infer.results"]["action"] == "send"
    assert "evt.deploy.ready" in addresses.values()  # FastStream's own channels are still there


def test_the_schemas_are_the_pydantic_models_and_check_what_a_client_sends(doc):
    schemas = doc["components"]["schemas"]
    # generated, so a field added to the models is documented without a further step
    for model in (InferenceRequest, SamplingOptions):
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields), model
    own = SamplingOptions.model_json_schema(ref_template=REF)
    assert schemas["SamplingOptions"] == {k: v for k, v in own.items() if k != "$defs"}
    assert all(schemas[name] == definition for name, definition in own.get("$defs", {}).items())  # hoisted, the same

    for channel in ("infer.request", "infer.jobs"):
        schema = payload(doc, channel, "InferenceRequest")
        jsonschema.validate({"model": "m", "prompt": "And God said", "request_id": "job-1",
                             "sampling": {"max_tokens": 8, "n": 2, "seed": 7}}, schema)
        with pytest.raises(jsonschema.ValidationError):  # the worker forbids unknown fields, and so does the schema
            jsonschema.validate({"model": "m", "prompt": "x", "sampling": {"choices": 2}}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"model": "m", "prompt": "x", "sampling": {"n": 0}}, schema)

    reply = InferenceReply(
        request_id="r",
        model={"name": "m", "version": 1, "digest": "sha256:" + "0" * 64},
        text="t",
        finish_reason="length",
        usage=Usage(prompt_tokens=1, completion_tokens=2),
    )
    result = InferenceResult(ok=True, result=reply).model_dump(mode="json")
    jsonschema.validate(result, payload(doc, "infer.results", "InferenceResult"))
    jsonschema.validate(
        {"kind": "chunk", "request_id": "r", "index": 0, "text": "x"},
        payload(doc, "infer.request.reply", "StreamMessage"),
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "chunk", "request_id": "r"}, payload(doc, "infer.request.reply", "StreamMessage"))


def test_the_schemas_do_not_replace_faststreams(doc):
    """A model both documents (ModelId, from the events) has one schema; a clash would raise."""
    assert doc["components"]["schemas"]["ModelId"]["properties"]["name"]
    assert "Event[InferenceCompleted]" in doc["components"]["schemas"]
