"""A new user's path for every supported family: a transformers-made checkpoint is pushed with
`strata model push`, deployed with `strata deploy`, and answers the official openai client through the
gateway of a real `strata up`, exactly as the engine answers offline."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest

from services.inference_worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine.conftest import FAMILY_SPECS, build_checkpoint, tokenizer_dir  # noqa: F401  (fixture)
from tests.support.up import Up

pytestmark = pytest.mark.timeout(300)
PROMPT = "Once upon a time there was a small model that"


@pytest.fixture(scope="module")
def platform(bare_platform):
    return bare_platform


def strata(up: Up, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "STRATA_API_KEY": up.api_key, "STRATA_DATA_DIR": str(up.data_dir),
           "STRATA_MODEL_STORE_URL": up.url("model-store")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_push_deploy_and_chat_through_the_gateway(family, platform, tokenizer_dir, tmp_path):
    ckpt = build_checkpoint(tmp_path / family, tokenizer_dir, **FAMILY_SPECS[family])
    name = f"fam-{family.replace('_', '-')}"
    pushed = strata(platform, "model", "push", str(ckpt.path), "--name", name)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    deployed = strata(platform, "deploy", name, "--context", "256", "--load-timeout", "120")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key)
    got = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    reference = LLMEngine.from_pretrained(ckpt.path, EngineConfig(device="cpu", dtype="float32", num_blocks=64))
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.choices[0].text == expected.text
    assert got.usage.completion_tokens == 12

    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Call me Ishmael."}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and 0 < chat.usage.completion_tokens <= 6
