"""A new user's GGUF path on a real `strata up`: push a .gguf (made here, no hub), deploy it, chat and
stream through the gateway with the official openai client, and find the llama.cpp runtime in
`strata deployments`, in the inference event and in the ledger's receipt."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import openai  # noqa: E402

from tests.support.gguf_model import write_random_gguf  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def platform(bare_platform):
    return bare_platform


def test_push_deploy_chat_stream_and_see_the_runtime(platform, tmp_path):
    gguf_file = write_random_gguf(tmp_path / "tiny.Q8_0.gguf", "q8_0", seed=5)
    pushed = platform.strata("model", "push", str(gguf_file), "--name", "tiny-gguf")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    deployed = platform.strata("deploy", "tiny-gguf", "--context", "256", "--load-timeout", "120")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key)
    chat = client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": "Call me Ishmael."}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and 0 < chat.usage.completion_tokens <= 8
    again = client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": "Call me Ishmael."}],
                                           max_tokens=8, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy is greedy
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-gguf", messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=8, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    text = client.completions.create(model="tiny-gguf", prompt="hello", max_tokens=5, temperature=0)
    assert text.usage.completion_tokens <= 5
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-gguf", prompt="x" * 400, max_tokens=5)
    # what this runtime does not do yet is refused, saying so, not failed
    with pytest.raises(openai.BadRequestError, match="llama.cpp runtime"):
        client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="llama.cpp runtime"):
        client.embeddings.create(model="tiny-gguf", input="hi")

    listed = platform.strata("deployments", "--json")
    assert listed.returncode == 0, listed.stderr
    [replica] = [r for d in json.loads(listed.stdout)["deployments"] if d["model_ref"] == "tiny-gguf" for r in d["replicas"]]
    assert replica["runtime"] == "llama.cpp" and replica["status"] == "ready"
    receipt = platform.strata("receipt", chat.id.removeprefix("chatcmpl-"))
    assert receipt.returncode == 0, receipt.stdout + receipt.stderr
    assert '"runtime":"llama.cpp"' in receipt.stdout.replace(" ", "") and "inference.completed" in receipt.stdout
