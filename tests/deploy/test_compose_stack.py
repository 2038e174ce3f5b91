"""The compose stack for real: build the images, bring docker-compose.yml up, and get one chat
completion from the built-in model through the api-gateway. Needs a Docker engine (and minutes)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = "strata-builtin-kjv"
pytestmark = pytest.mark.timeout(1800)


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"no Docker engine answers ({(info.stderr.strip().splitlines() or ['docker info failed'])[-1]})"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "the docker compose plugin is not installed"
    return None


@pytest.fixture(scope="module")
def stack():
    if problem := _docker_problem():
        pytest.skip(f"compose stack test needs Docker: {problem}")
    compose = pytest.importorskip("testcontainers.compose", reason="testcontainers (test extra) is not installed")
    with compose.DockerCompose(str(ROOT), compose_file_name="docker-compose.yml", build=True, wait=True) as running:
        yield running


def test_the_compose_stack_answers_a_chat_completion(stack):
    base = "http://127.0.0.1:8000/v1"
    deadline = time.monotonic() + 600  # images built, model registered and deployed on a CPU worker
    with httpx.Client(timeout=30) as client:
        while True:
            try:
                if BUILTIN in {m["id"] for m in client.get(f"{base}/models").json()["data"]}:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, f"{BUILTIN} never appeared in /v1/models"
            time.sleep(5)
        reply = client.post(f"{base}/chat/completions", json={
            "model": BUILTIN, "messages": [{"role": "user", "content": "In the beginning"}], "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] >= 1
