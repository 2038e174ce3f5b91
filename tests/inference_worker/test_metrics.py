"""The worker's live engine gauges at its /metrics, per deployed model, under vLLM's names with our
prefix (real nats-server, a real engine): running and waiting requests and KV-cache use while a
stream is in flight, back to idle after it."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from shared.inference import CANCEL_SUBJECT, InferenceCancel
from tests.inference_worker.conftest import deployed
from tests.inference_worker.test_serving import stream


def gauges(service) -> dict[str, float]:
    text = service.metrics.exposition().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("model_name") == "tiny" and s.labels.get("deployment") == "dep-tiny/0"}


async def test_engine_gauges_follow_a_request_in_flight(worker, bus_client):
    await deployed(bus_client, "tiny")
    idle = gauges(worker)
    assert idle["strata:num_requests_running"] == 0 and idle["strata:num_requests_waiting"] == 0
    assert idle["strata:kv_cache_usage_perc"] == 0 and idle["strata:num_preemptions_total"] == 0
    seen: dict[str, float] = {}

    async def look_then_cancel(msg) -> None:
        if msg.kind == "chunk" and not seen:
            seen.update(gauges(worker))
            await bus_client.nc.publish(CANCEL_SUBJECT, InferenceCancel(request_id="busy").model_dump_json().encode())

    await stream(bus_client, "tiny", look_then_cancel, request_id="busy", prompt="It was",
                 sampling={"max_tokens": 240, "temperature": 0})
    assert seen["strata:num_requests_running"] == 1
    assert 0 < seen["strata:kv_cache_usage_perc"] <= 1
    after = gauges(worker)
    assert after["strata:num_requests_running"] == 0 and after["strata:kv_cache_usage_perc"] == 0
