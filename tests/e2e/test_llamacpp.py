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
    again = client.chat.completions.create(
        model="tiny-gguf", messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy is greedy
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-gguf",
            messages=[{"role": "user", "content": "Call me Ishmael."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        if c.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    text = client.completions.create(model="tiny-gguf", prompt="hello", max_tokens=5, temperature=0)
    assert text.usage.completion_tokens <= 5
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-gguf", prompt="x" * 400, max_tokens=5)
    # what this runtime does not do yet is refused, saying so, not failed
    with pytest.raises(openai.BadRequestError, match="llama.cpp runtime"):
        client.chat.completions.create(
            model="tiny-gguf",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            response_format={"type": "json_object"},
        )
    with pytest.raises(openai.BadRequestError, match="llama.cpp runtime"):
        client.embeddings.create(model="tiny-gguf", input="hi")

    listed = platform.strata("deployments", "--json")
    assert listed.returncode == 0, listed.stderr
    [replica] = [
        r for d in json.loads(listed.stdout)["deployments"] if d["model_ref"] == "tiny-gguf" for r in d["replicas"]
    ]
    assert replica["runtime"] == "llama.cpp" and replica["status"] == "ready"
    receipt = platform.strata("receipt", chat.id.removeprefix("chatcmpl-"))
    assert receipt.returncode == 0, receipt.stdout + receipt.stderr
    assert '"runtime":"llama.cpp"' in receipt.stdout.replace(" ", "") and "inference.completed" in receipt.stdout


def test_a_safetensors_model_converted_to_q4_k_m_serves_with_its_lineage_to_the_source(platform, tmp_path, monkeypatch):
    from tests.support.gguf_model import write_random_pair
    from tests.support.local_caches import make_hf_snapshot

    ckpt, _ = write_random_pair(
        tmp_path / "made", ftypes=(), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, seed=6
    )
    make_hf_snapshot(tmp_path / "hub", "acme/tiny-e2e", {p.name: p.read_bytes() for p in ckpt.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    imported = platform.strata("model", "import", "hf:acme/tiny-e2e")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    converted = platform.strata(
        "model", "convert", "tiny-e2e", "--to", "gguf", "--quant", "q4_k_m", "--name", "tiny-e2e-q4"
    )
    assert converted.returncode == 0 and "-> tiny-e2e-q4:1" in converted.stdout, converted.stdout + converted.stderr
    deployed = platform.strata("deploy", "tiny-e2e-q4", "--context", "256", "--load-timeout", "120")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key)
    chat = client.chat.completions.create(
        model="tiny-e2e-q4", messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=8, temperature=0
    )
    assert 0 < chat.usage.completion_tokens <= 8
    answer = platform.strata("lineage", chat.id.removeprefix("chatcmpl-"), "--json")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    model = json.loads(answer.stdout)["model"]
    assert (model["name"], model["source"]["kind"], model["source"]["name"]) == (
        "tiny-e2e-q4",
        "conversion",
        "tiny-e2e",
    )
    origin = platform.strata("lineage", "--model", "tiny-e2e-q4", "--json")
    assert origin.returncode == 0, origin.stdout + origin.stderr
    [parent] = json.loads(origin.stdout)["models"][0]["derived_from"]
    assert parent["digest"] == model["source"]["derived_from"] and parent["source"]["name"] == "acme/tiny-e2e"
    undeployed = platform.strata("undeploy", "tiny-e2e-q4")
    assert undeployed.returncode == 0, undeployed.stdout + undeployed.stderr
