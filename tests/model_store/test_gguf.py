"""GGUF in model-store: a .gguf (one file, or every part of a gguf-split) is content-addressed and signed
like a safetensors checkpoint; its manifest's metadata comes from the GGUF header (gguf package, no
llama.cpp); an unreadable GGUF is refused at upload and nothing is stored."""

from __future__ import annotations

from pathlib import Path

import httpx
import nats
import pytest

pytest.importorskip("gguf")

from cli.main import main  # noqa: E402
from shared.architectures import LLAMACPP  # noqa: E402
from shared.catalog import PushModelRequest  # noqa: E402
from shared.model_fetch import fetch_model  # noqa: E402
from tests.model_store.conftest import upload_dir  # noqa: E402
from tests.support.gguf_model import CHAT_TEMPLATE, write_random_gguf  # noqa: E402
from tests.support.helpers import make_service  # noqa: E402


def http(service) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://store")


async def push(client, directory: Path, name: str) -> httpx.Response:
    files = await upload_dir(client, directory)
    return await client.post("/v1/models", json=PushModelRequest(name=name, files=files).model_dump(mode="json"))


async def test_a_gguf_is_pushed_signed_and_described_from_its_header(nats_server, tmp_path):
    d = tmp_path / "q8"
    d.mkdir()
    write_random_gguf(d / "tiny.Q8_0.gguf", "q8_0")
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        r = await push(client, d, "tiny-gguf")
        assert r.status_code == 201, r.text
        body = r.json()
        meta = body["manifest"]["metadata"]
        assert body["warnings"] == []
        assert (meta["format"], meta["architecture"], meta["quantization"], meta["runtime"]) == (
            "gguf",
            "llama",
            "Q8_0",
            LLAMACPP,
        )
        assert meta["context_length"] == 256 and meta["chat_template"] == CHAT_TEMPLATE
        assert (meta["num_layers"], meta["hidden_size"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (
            2,
            64,
            4,
            2,
            16,
        )
        assert meta["vocab_size"] == 264  # 256 bytes, 3 merged tokens, 5 special tokens
        assert meta["parameters"] == 264 * 64 * 2 + 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64
        assert (
            set(meta["bytes_by_type"]) == {"Q8_0", "F32"}
            and sum(meta["bytes_by_type"].values()) == meta["weight_bytes"]
        )
        assert body["manifest"]["files"][0]["path"] == "tiny.Q8_0.gguf"
        # the same bytes again: the same version; then a worker's fetch checks the signature and digest
        again = await push(client, d, "tiny-gguf")
        assert again.status_code == 200 and again.json()["model"] == body["model"]
        nc = await nats.connect(nats_server.url)
        try:
            local = await fetch_model(nc, "tiny-gguf:1", tmp_path / "cache")
        finally:
            await nc.close()
        assert (local.path / "tiny.Q8_0.gguf").read_bytes() == (d / "tiny.Q8_0.gguf").read_bytes()


async def test_a_split_gguf_is_one_model_and_a_lone_part_is_refused(nats_server, tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    write_random_gguf(d / "tiny.gguf", "f16", split_max_tensors=10)
    parts = sorted(p.name for p in d.iterdir())
    assert parts == ["tiny-00001-of-00003.gguf", "tiny-00002-of-00003.gguf", "tiny-00003-of-00003.gguf"]
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        r = await push(client, d, "split")
        assert r.status_code == 201, r.text
        meta = r.json()["manifest"]["metadata"]
        assert (meta["quantization"], meta["architecture"], meta["num_layers"]) == ("F16", "llama", 2)
        (d / "tiny-00002-of-00003.gguf").unlink()
        (d / "tiny-00003-of-00003.gguf").unlink()
        lone = await push(client, d, "lone")
        assert lone.status_code == 400 and "part 1 of a 3-file split GGUF" in lone.text


async def test_an_unreadable_gguf_is_refused_at_upload_and_nothing_is_stored(nats_server, tmp_path):
    import hashlib

    good = write_random_gguf(tmp_path / "good.gguf")
    broken = good.read_bytes()[:200]  # the header cut short: counts promise tensors the file lacks
    cases = {"cut.gguf": broken, "text.gguf": b"this is not a GGUF file at all"}
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        for path, data in cases.items():
            sha = hashlib.sha256(data).hexdigest()
            r = await client.put(f"/v1/blobs/{sha}", params={"path": path}, content=data)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith(f"{path}: not a")
            assert (await client.head(f"/v1/blobs/{sha}")).status_code == 404


def test_strata_model_push_takes_a_gguf_file(live_store, tmp_path, capsys):
    gguf_file = write_random_gguf(tmp_path / "tiny.F16.gguf", "f16")
    code = main(["model", "push", str(gguf_file), "--name", "tiny", "--url", live_store.url])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("registered tiny:1 sha256:"), err
    assert main(["model", "show", "tiny", "--json", "--url", live_store.url]) == 0
    shown = capsys.readouterr().out
    assert '"quantization": "F16"' in shown and '"path": "tiny.F16.gguf"' in shown
