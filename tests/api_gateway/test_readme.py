"""The README's "Serve a model" examples run as printed (only the port differs) against the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from builtin_model import MODEL_NAME  # the name the built-in is registered under
from tests.support.fake_worker import Script

README = Path(__file__).resolve().parents[2] / "README.md"
PRINTED_URL = "http://127.0.0.1:8000"
PRINTED_KEY_FILE = ".strata/api-key"
KEY = "sk-strata-readme-example-key"


@pytest.fixture
def keyed_gateway(gateway_factory, tmp_path):
    """A gateway that needs a key, and the key in a file where the README says `strata up` puts it."""
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    return gateway_factory(seed_keys=[KEY]), key_file


def as_printed(code: str, gateway, key_file: Path) -> str:
    return code.replace(PRINTED_URL, gateway.base_url).replace(PRINTED_KEY_FILE, str(key_file))


def section() -> str:
    text = README.read_text()
    return text[text.index("## Serve a model"):].split("\n## ", 2)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), flags=re.S)


def test_examples_use_the_builtin_model_name():
    assert blocks("python") and blocks("sh")
    assert all(MODEL_NAME in b for b in blocks("python"))
    assert MODEL_NAME in blocks("sh")[0]


async def test_python_example_as_printed(keyed_gateway, workers):
    await workers({MODEL_NAME: Script()})
    code = as_printed(blocks("python")[0], *keyed_gateway)
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})

    await asyncio.to_thread(run)
    assert out.getvalue() == "Hello, world!\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed here")
async def test_curl_example_as_printed(keyed_gateway, workers):
    await workers({MODEL_NAME: Script()})
    script = as_printed(blocks("sh")[0], *keyed_gateway)
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert f'"id":"{MODEL_NAME}"' in done.stdout and '"content":"Hello, world!"' in done.stdout
