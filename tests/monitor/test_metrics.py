"""Events, heartbeats and dead letters through a real NATS become Prometheus metrics at /metrics."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.monitor.conftest import Running, until
from tests.monitor.script import scripted_run


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(all_samples: dict, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


async def test_a_scripted_run_becomes_prometheus_metrics(running: Running):
    await scripted_run(running.publisher)
    state = running.monitor.state
    await until(lambda: state.ledger.tree_size == 57 and state.dead_letter_totals and len(state.nodes) == 2
                and state.nodes["gpu-1"].utilisation, "the scripted run to arrive")

    response = await running.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)

    # per-model request metrics, vLLM's names under the strata: prefix, with the model_name label
    assert value(m, "strata:request_success_total", model_name="tiny", finished_reason="stop") == 24
    assert value(m, "strata:request_success_total", model_name="tiny", finished_reason="length") == 6
    assert value(m, "strata:request_failure_total", model_name="tiny") == 1  # "tiny@prod" counts as tiny
    assert value(m, "strata:prompt_tokens_total", model_name="tiny") == 30 * 12
    assert value(m, "strata:generation_tokens_total", model_name="tiny") == 30 * 20
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(m, f"strata:{histogram}_count", model_name="tiny") == 30
    assert value(m, "strata:e2e_request_latency_seconds_bucket", model_name="tiny", le="0.5") == 16  # 0.20 .. 0.50
    assert value(m, "strata:e2e_request_latency_seconds_bucket", model_name="tiny", le="+Inf") == 30

    # deployments by state, nodes and devices, the ledger, dead letters
    assert value(m, "strata:deployments", model_name="tiny", state="ready") == 1
    assert value(m, "strata:deployments", model_name="broken", state="failed") == 1
    assert value(m, "strata:node_up", node="gpu-1") == 1
    assert value(m, "strata:device_memory_total_bytes", node="gpu-1", device="cuda:0", kind="cuda") == 80 * 2**30
    assert value(m, "strata:device_memory_free_bytes", node="gpu-1", device="cuda:0", kind="cuda") == 30 * 2**30
    assert value(m, "strata:device_utilisation_ratio", node="gpu-1", device="cuda:0") == 0.72
    assert value(m, "strata:node_ram_free_bytes", node="cpu-1") == 40 * 2**30
    assert value(m, "strata:ledger_tree_size") == 57
    assert value(m, "strata:ledger_checkpoint_age_seconds") >= 0
    assert value(m, "strata:dead_letters_total", service="model-store") == 1
    assert value(m, "strata:events_total", type="inference.completed") == 30
    await until(lambda: running.monitor.alerts.firing(), "the failed deployment's alert")
    m = samples((await running.http.get("/metrics")).text)
    assert value(m, "strata:alerts_firing", rule="deploy_failed", severity="warning") == 1


async def test_ledger_lag_is_the_ledger_consumers_pending_events(running: Running):
    """Lag is read from the ledger's durable on EVENTS; without one it is unknown (absent), not zero."""
    from nats.js.api import AckPolicy, ConsumerConfig

    await until(lambda: running.monitor.state.ledger.lag is None and running.monitor.version >= 0, "a first poll")
    m = samples((await running.http.get("/metrics")).text)
    assert not any(name == "strata:ledger_lag_events" for name, _ in m)

    await scripted_run(running.publisher)  # events the "ledger" below has not consumed
    js = running.publisher.nc.jetstream()
    await js.add_consumer("EVENTS", ConsumerConfig(durable_name="provenance-ledger-log", ack_policy=AckPolicy.EXPLICIT))
    # nothing acknowledged: the lag is the whole stream (which the monitor's own alert events grow too)
    for _ in range(200):
        stored = (await js.stream_info("EVENTS")).state.messages
        if running.monitor.state.ledger.lag == stored:
            break
        await asyncio.sleep(0.1)
    assert running.monitor.state.ledger.lag == stored > 30
    m = samples((await running.http.get("/metrics")).text)
    assert value(m, "strata:ledger_lag_events") >= stored
