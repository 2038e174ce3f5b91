"""The envelope and event schemas, without NATS."""

import json

import pytest

from shared.events import (
    DeployRequested,
    Event,
    EventData,
    MalformedEvent,
    ModelId,
    ModelRegistered,
    NodeHeartbeat,
    Source,
    make_event,
    parse_event,
)

SOURCE = Source(service="model-store", node="node-a")


def registered() -> Event[ModelRegistered]:
    model = ModelId(name="tiny", version=3, digest="sha256:" + "ab" * 32)
    return make_event(
        ModelRegistered(model=model, architecture="LlamaForCausalLM", parameters=1234, datasets=["sha256:cd"]), SOURCE
    )


def test_envelope_round_trip_keeps_every_field_and_the_typed_data():
    event = registered()
    parsed = parse_event(event.to_bytes(), "evt.model.registered")
    assert parsed == event
    assert isinstance(parsed.data, ModelRegistered)
    assert parsed.data.model.version == 3
    assert parsed.version == ModelRegistered.VERSION and parsed.type == "model.registered"
    assert parsed.source == SOURCE and parsed.time.tzinfo is not None


def test_every_event_type_has_one_class_and_a_subject_in_its_domain():
    assert EventData.registry["deploy.requested"] is DeployRequested
    for event_type, cls in EventData.registry.items():
        prefix = "evt." if cls.PERSISTENT else "live."
        assert cls.subject() == prefix + event_type
    assert NodeHeartbeat.subject() == "live.node.heartbeat"  # telemetry stays out of the EVENTS stream
    publishers = {"hardware-inventory", "inference-worker", "model-store", "provenance-ledger", "monitor", "client"}
    assert {cls.PUBLISHER for cls in EventData.registry.values()} == publishers
    with pytest.raises(TypeError, match="defined twice"):
        type("Again", (EventData,), {"TYPE": "deploy.requested", "__annotations__": {}})


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: "not json at all", "invalid envelope"),
        (lambda d: {k: v for k, v in d.items() if k != "source"}, "source: Field required"),
        (lambda d: {**d, "type": "model.exploded"}, "unknown event type 'model.exploded'"),
        (lambda d: {**d, "version": 99}, "schema version 99 is newer"),
        (lambda d: {**d, "data": {**d["data"], "parameters": "many"}}, "invalid model.registered data: parameters"),
        (lambda d: {**d, "data": {**d["data"], "model": None}}, "model"),
        (lambda d: {**d, "id": ""}, "id"),
    ],
)
def test_malformed_events_are_refused_with_the_reason(mutate, reason):
    doc = json.loads(registered().to_bytes())
    changed = mutate(doc)
    raw = changed.encode() if isinstance(changed, str) else json.dumps(changed).encode()
    with pytest.raises(MalformedEvent) as err:
        parse_event(raw, "evt.model.registered")
    assert reason in str(err.value)


def test_an_event_on_another_types_subject_is_refused():
    with pytest.raises(MalformedEvent, match="arrived on subject 'evt.deploy.ready'"):
        parse_event(registered().to_bytes(), "evt.deploy.ready")


def test_unknown_payload_fields_are_ignored_for_forward_compatibility():
    doc = json.loads(registered().to_bytes())
    doc["data"]["added_in_a_later_release"] = True
    assert parse_event(json.dumps(doc).encode()).data == registered().data


def test_the_published_subject_table_matches_the_schemas():
    from pathlib import Path

    from cli.platform import subject_table

    table = Path(__file__).resolve().parents[2] / "infra" / "SUBJECTS.md"
    assert table.read_text() == subject_table(), "regenerate with: strata subjects > infra/SUBJECTS.md"


def test_model_names_with_dots_stay_one_subject_token():
    from shared import subjects

    assert subjects.inference_request("qwen2.5-0.5b") == "infer.request.qwen2%2E5-0%2E5b"
    assert subjects.token("a b>*%") == "a%20b%3E%2A%25"
    assert subjects.inference_request("tiny") == "infer.request.tiny"


def test_an_inference_request_takes_exactly_one_of_messages_or_prompt():
    from pydantic import ValidationError

    from shared.inference import InferenceRequest

    assert InferenceRequest(model="tiny", prompt="Once").messages is None
    for bad in ({}, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}):
        with pytest.raises(ValidationError, match="exactly one of 'messages'"):
            InferenceRequest(model="tiny", **bad)
    with pytest.raises(ValidationError, match="temperature"):
        InferenceRequest(model="tiny", prompt="x", sampling={"temperature": -1})


def test_dtype_and_quantize_are_additive_on_deploy_events():
    """#24: deploy.requested/scheduled carry ``quantize`` and deploy.ready the dtype and quantization that
    answer; messages from before the fields still validate, and the ledger's leaf (the whole envelope,
    services/provenance_ledger/domain/canonical.py) keeps them."""
    from services.provenance_ledger.domain.canonical import leaf_bytes, parse_leaf
    from shared.events import DeployReady, DeployRequested, MeasuredMemory, ModelId, Source, make_event, parse_event

    model = ModelId(name="m", version=1, digest="sha256:" + "0" * 64)
    ready = DeployReady(
        deployment_id="d",
        model=model,
        node_id="n",
        device="cpu",
        load_seconds=1.0,
        measured=MeasuredMemory(weights=1, kv_cache=1, peak=2),
        dtype="bfloat16",
        quantize="int8",
    )
    raw = make_event(ready, Source(service="inference-worker", node="n")).model_dump_json().encode()
    assert parse_event(raw).data.quantize == "int8"
    leaf = parse_leaf(leaf_bytes(json.loads(raw), 0))
    assert leaf.event["data"]["dtype"] == "bfloat16" and leaf.event["data"]["quantize"] == "int8"
    old = json.loads(raw)
    del old["data"]["dtype"], old["data"]["quantize"]
    assert parse_event(json.dumps(old).encode()).data.quantize is None
    assert DeployRequested(model_ref="m").quantize is None
