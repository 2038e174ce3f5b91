"""The README's plain nats-py program ("Over NATS, from your own program"), taken from README.md as it
stands and run as its own process against a real `strata up` with the built-in model: a request and a
batch job, each with n choices, on the `app` credential that `strata up` made."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme:nats-program -->"
pytestmark = pytest.mark.timeout(600)


def readme_program(text: str) -> str:
    """The ```python block right after the marker; the test fails here when the README lost it."""
    found = re.search(re.escape(MARKER) + r"\n```python\n(.*?)\n```\n", text, re.S)
    assert found, f"README.md has no ```python block after {MARKER}"
    return found.group(1)


def test_the_program_is_plain_nats_py():
    """Copy-pasteable into any project: it imports nothing of Strata's, and uses the fields it shows."""
    text = README.read_text()
    with pytest.raises(AssertionError, match="no ```python block"):  # without its marker the block is not found
        readme_program(text.replace(MARKER, ""))
    program = readme_program(text)
    imports = set(re.findall(r"^(?:import|from) ([\w.]+)", program, re.M))
    assert imports == {"asyncio", "json", "os", "uuid", "pathlib", "nats"}, imports
    for shown in ('"n": 2', '"seed": 7', "infer.request.", "infer.jobs.", "infer.results.", '"app.json"',
                  'inbox_prefix="_INBOX.app"'):
        assert shown in program, shown


def test_the_readme_program_gets_a_reply_and_a_job_result_from_a_real_stack(platform, tmp_path):
    platform.wait_for("Strata is up", timeout=120)
    platform.wait_for("built-in model strata-builtin-kjv is serving", timeout=240)
    assert any("app.json" in line for line in platform.lines), "strata up does not say where the app credential is"
    env = {**os.environ, "STRATA_DATA_DIR": str(platform.data_dir),
           "STRATA_NATS_URL": f"nats://127.0.0.1:{platform.nats_port}"}
    for name in ("STRATA_NATS_USER", "STRATA_NATS_PASSWORD"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", readme_program(README.read_text())], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = re.findall(r"^(request|job) choice (\d+): (.+)$", run.stdout, re.M)
    assert [(via, int(i)) for via, i, _ in lines] == [("request", 0), ("request", 1), ("job", 0), ("job", 1)], (
        run.stdout
    )
    assert all(ast.literal_eval(text).strip() for _, _, text in lines), run.stdout  # each of the n choices has text

    # The schemas the README points at are served where it says.
    doc = httpx.get(platform.url("inference-worker") + "/asyncapi.json", timeout=10).json()
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert {"infer.request.{model}", "infer.jobs.{model}", "infer.results.{request_id}"} <= addresses
