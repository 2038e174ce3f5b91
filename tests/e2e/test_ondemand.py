"""Many models on little memory, on a real `strata up`: `strata deploy --on-demand --keep-alive` loads
nothing; the first chat through the gateway (the openai client) loads the model and answers; idle past
the keep-alive it is unloaded; the next chat loads it again; `strata deployments` says on-demand, loaded
or not, and the keep-alive. A load the worker cannot make room for is a clear OpenAI-style error."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import openai  # noqa: E402

from tests.support.gguf_model import write_random_gguf  # noqa: E402
from tests.support.up import Up  # noqa: E402

pytestmark = pytest.mark.timeout(300)
CHAT = dict(messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=6, temperature=0)


def replica(platform: Up, ref: str) -> tuple[dict, dict]:
    listed = platform.strata("deployments", "--json")
    assert listed.returncode == 0, listed.stderr
    [deployment] = [d for d in json.loads(listed.stdout)["deployments"] if d["model_ref"] == ref]
    return deployment, deployment["replicas"][0]


def ledger_types(platform: Up, model: str) -> list[str]:
    audit = platform.strata("audit", "--model", model, "--json")
    assert audit.returncode == 0, audit.stderr
    return [row["type"] for row in json.loads(audit.stdout)]


def until(check, timeout: float = 60.0, what: str = "condition"):
    """Poll a `strata` query until it says what the test waits for (each poll is a CLI call, ~1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def push_and_deploy(platform: Up, tmp_path, name: str, *deploy_args: str) -> None:
    gguf_file = write_random_gguf(tmp_path / f"{name}.Q8_0.gguf", "q8_0", seed=5)
    pushed = platform.strata("model", "push", str(gguf_file), "--name", name)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    deployed = platform.strata("deploy", name, "--context", "256", *deploy_args)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr


def test_on_demand_loads_at_the_first_chat_unloads_when_idle_and_loads_again(bare_platform, tmp_path):
    platform = bare_platform
    push_and_deploy(platform, tmp_path, "lazy-gguf", "--on-demand", "--keep-alive", "2s")
    deployment, r = replica(platform, "lazy-gguf")
    assert deployment["on_demand"] and deployment["keep_alive_s"] == 2.0
    assert r["status"] == "ready" and r["loaded"] is False  # deployed, nothing in memory
    table = platform.strata("deployments")
    assert "keep-alive 2s" in table.stdout and "unloaded" in table.stdout, table.stdout

    client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key, max_retries=0)
    started = time.monotonic()
    first = client.chat.completions.create(model="lazy-gguf", **CHAT)
    cold = time.monotonic() - started
    assert 0 < first.usage.completion_tokens <= 6
    # it was loaded by that chat; the keep-alive (2 s idle) then unloads it
    until(
        lambda: (
            replica(platform, "lazy-gguf")[1]["loaded"] is False and replica(platform, "lazy-gguf")[1]["measured_peak"]
        ),
        what="the idle unload",
    )
    started = time.monotonic()
    again = client.chat.completions.create(model="lazy-gguf", **CHAT)
    reloaded = time.monotonic() - started
    assert again.choices[0].message.content == first.choices[0].message.content  # the same weights, greedy
    started = time.monotonic()
    client.chat.completions.create(model="lazy-gguf", **CHAT)
    warm = time.monotonic() - started
    print(f"\nthrough the gateway: first chat {cold:.3f}s (with load), after unload {reloaded:.3f}s, warm {warm:.3f}s")
    # the ledger logs every load and unload with the deployment's other events
    types = until(
        lambda: (t := ledger_types(platform, "lazy-gguf")).count("deploy.model_loaded") >= 2 and t,
        what="two loads in the ledger",
    )
    assert types.index("deploy.ready") < types.index("deploy.model_loaded") < types.index("deploy.model_unloaded")


def test_a_load_with_no_room_is_a_clear_error_and_nothing_stays_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_INFERENCE_WORKER_ONDEMAND_MEMORY_BYTES", "1")  # no room for any on-demand model
    platform = Up(tmp_path / "data", "--no-builtin")
    try:
        platform.wait_for("Strata is up", timeout=90)
        push_and_deploy(platform, tmp_path, "roomless-gguf", "--on-demand")
        client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="roomless-gguf", **CHAT)
        assert refused.value.status_code == 503
        error = refused.value.body.get("error", refused.value.body)
        assert "cannot load roomless-gguf:1" in error["message"] and "not enough memory" in error["message"], error
        assert refused.value.response.headers.get("retry-after")
        assert replica(platform, "roomless-gguf")[1]["loaded"] is False
    finally:
        platform.stop()
