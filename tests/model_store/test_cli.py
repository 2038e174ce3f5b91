"""The CLI end to end: strata dataset/model commands against model-store behind real uvicorn."""

from __future__ import annotations

import asyncio
import json

import nats

from cli.main import main
from shared.catalog import BLOB_BUCKET
from tests.model_store.conftest import make_checkpoint


def strata(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dataset_push_ls_show_alias_pull_verify_rm(live_store, tmp_path, capsys):
    url = ("--url", live_store.url)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\n")
    code, out, _ = strata(capsys, "dataset", "add", str(corpus), "--license", "public domain", "--source", "kjv", *url)
    assert code == 0 and "registered dataset corpus.txt sha256:" in out
    digest = out.split()[-1]

    source = make_checkpoint(tmp_path / "ckpt", seed=4)
    code, out, err = strata(
        capsys, "model", "push", str(source), "--name", "tiny", "--dataset", digest, "--license", "mit", *url
    )
    assert code == 0 and out.startswith("registered tiny:1 sha256:"), err
    assert "push tiny" in err  # the progress bar
    code, out, _ = strata(capsys, "model", "push", str(source), "--name", "tiny", *url)
    assert code == 0 and "registered tiny:1" not in out  # different lineage -> a new version
    code, out, _ = strata(
        capsys, "model", "push", str(source), "--name", "tiny", "--dataset", digest, "--license", "mit", *url
    )
    assert out.startswith("already registered as tiny:1")

    code, out, _ = strata(capsys, "model", "alias", "tiny:1", "prod", *url)
    assert code == 0 and "tiny@prod -> 1" in out
    code, out, _ = strata(capsys, "model", "ls", "--json", *url)
    listed = json.loads(out)["models"]
    assert [(m["model"]["version"], m["aliases"], m["datasets"]) for m in listed] == [
        (1, ["prod"], [digest]),
        (2, [], []),
    ]
    code, out, _ = strata(capsys, "model", "ls", *url)
    assert code == 0 and "tiny" in out and "LlamaForCausalLM" in out
    code, out, _ = strata(capsys, "model", "show", "tiny@prod", *url)
    assert code == 0 and "tiny:1" in out and "model.safetensors" in out

    pulled = tmp_path / "pulled"
    code, out, err = strata(capsys, "model", "pull", "tiny@prod", str(pulled), *url)
    assert code == 0 and "signature and 3 digests verified" in out and "pull tiny:1" in err
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (pulled / name).read_bytes() == (source / name).read_bytes()
    key = tmp_path / "key.json"
    key.write_text(json.dumps(live_store_key(live_store)))
    code, out, _ = strata(capsys, "model", "verify", "tiny@prod", "--key", str(key), *url)
    assert code == 0 and out.startswith("OK tiny:1")

    # a flipped byte in the stored weights: verify fails naming the file
    asyncio.run(
        flip_last_byte(live_store.nats_url, json.loads(strata(capsys, "model", "show", "tiny:1", "--json", *url)[1]))
    )
    code, out, err = strata(capsys, "model", "verify", "tiny:1", *url)
    assert code == 1 and "FAILED model.safetensors: stored content hashes to" in err
    code, _, err = strata(capsys, "model", "pull", "tiny:1", str(tmp_path / "again"), *url)
    assert code == 1 and "model.safetensors: downloaded content hashes to" in err
    assert not (tmp_path / "again" / "model.safetensors").exists()

    code, _, err = strata(capsys, "model", "push", str(tmp_path / "nothing"), "--name", "x", *url)
    assert code == 1 and "not a directory" in err
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04stuff")
    code, _, err = strata(capsys, "model", "push", str(source), "--name", "tiny", *url)
    assert code == 1 and "pytorch_model.bin: .bin files are refused" in err
    code, _, err = strata(capsys, "model", "show", "tiny@canary", *url)
    assert code == 1 and "not_found" in err and "no alias 'canary'" in err
    code, out, _ = strata(capsys, "model", "rm", "tiny:2", *url)
    assert code == 0 and "deleted tiny:2" in out
    code, _, err = strata(capsys, "model", "ls", "--url", "http://127.0.0.1:9")
    assert code == 1 and "not reachable" in err


def live_store_key(live_store) -> dict:
    import httpx

    return httpx.get(f"{live_store.url}/v1/public-key").json()


async def flip_last_byte(nats_url: str, resolved: dict) -> None:
    sha = next(f["sha256"] for f in resolved["manifest"]["files"] if f["path"] == "model.safetensors")
    nc = await nats.connect(nats_url)
    try:
        store = await nc.jetstream().object_store(BLOB_BUCKET)
        data = bytearray((await store.get(sha)).data)
        data[-1] ^= 1
        await store.put(sha, bytes(data))
    finally:
        await nc.close()
