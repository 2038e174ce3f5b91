"""Every way a push is refused names the file and the problem: unit checks of the header parser,
then the same refusals through the HTTP API against the real nats-server."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from shared.catalog import FileEntry, PushModelRequest
from shared.errors import Invalid
from services.model_store.domain.checks import check_files_listing, check_path, inspect_safetensors
from services.model_store.domain.metadata import parse_config
from tests.model_store.conftest import make_checkpoint, upload_dir
from tests.support.helpers import make_service


def raw_safetensors(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def inspect(blob: bytes):
    return inspect_safetensors("w.safetensors", io.BytesIO(blob), len(blob))


def test_a_real_safetensors_file_is_summarised():
    blob = save({"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.int8)}, metadata={"format": "np"})
    summary = inspect(blob)
    assert (summary.tensors, summary.parameters, summary.data_bytes) == (2, 10, 28)
    assert summary.bytes_by_dtype == {"F32": 24, "I8": 4}


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x02", "too short for a safetensors file"),
        (raw_safetensors({}, length=10_000), "header length 10000 does not fit"),
        (struct.pack("<Q", 3) + b"{x}", "header is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "header must be a JSON object"),
        (
            struct.pack("<Q", 52) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":1}'[:52],
            "not valid JSON",
        ),
        (
            raw_safetensors({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "tensor 'a': unknown dtype 'F33'",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be a list of non-negative integers",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
            "data_offsets must be [begin, end]",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
            "end before they begin",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "run past the end of the data",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape [2] of F32 needs 8 bytes but data_offsets [0, 4] hold 4",
        ),
        (
            raw_safetensors(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlaps the tensor before it",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            "4 bytes before tensor 'a' belong to no tensor",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            "4 bytes after the last tensor belong to no tensor",
        ),
        (
            raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4),
            "exactly dtype, shape and data_offsets",
        ),
        (raw_safetensors({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    ],
)
def test_broken_safetensors_headers_are_refused_with_the_file_and_the_reason(blob, message):
    with pytest.raises(Invalid) as info:
        inspect(blob)
    assert info.value.message.startswith("w.safetensors: ") and message in info.value.message


def test_duplicate_tensor_names_are_refused():
    body = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(Invalid, match="key 'a' appears twice"):
        inspect(struct.pack("<Q", len(body)) + body + b"\0")


@pytest.mark.parametrize(
    "paths, message",
    [
        (["model.bin", "config.json"], "model.bin: .bin files are refused: pickle-based formats"),
        (["weights.pt"], "weights.pt: .pt files are refused"),
        (["x.ckpt"], "loading a pickle runs arbitrary code"),
        (["config.json"], "no .safetensors file"),
        (["model.safetensors"], "config.json: missing"),
        (["a.safetensors", "a.safetensors", "config.json"], "a.safetensors: listed twice"),
        ([], "no files"),
    ],
)
def test_file_listings_are_refused_with_the_reason(paths, message):
    with pytest.raises(Invalid, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_files_listing(paths, model=True)


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_paths_outside_the_directory_are_refused(path):
    with pytest.raises(Invalid, match="not a relative path"):
        check_path(path)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{", "config.json: not valid JSON"),
        (b"[1]", "config.json: must be a JSON object"),
        (b"{}", "names neither 'architectures' nor 'model_type'"),
        (b'{"architectures": "Llama"}', "'architectures' must be a non-empty list"),
        (b'{"model_type": "llama", "hidden_size": -3}', "hidden_size must be a positive integer"),
    ],
)
def test_bad_config_json_is_refused(raw, message):
    with pytest.raises(Invalid, match=message):
        parse_config(raw)


async def test_push_refusals_through_http(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http), base_url="http://s") as client,
    ):

        async def put(content: bytes, path: str, sha: str | None = None):
            return await client.put(
                f"/v1/blobs/{sha or hashlib.sha256(content).hexdigest()}", params={"path": path}, content=content
            )

        def error(r) -> str:
            assert r.status_code == 400, r.text
            return r.json()["error"]["message"]

        pickled = pickle.dumps({"w": [1.0, 2.0]})
        assert "pytorch_model.bin: .bin files are refused" in error(await put(pickled, "pytorch_model.bin"))
        assert "tokenizer.model: the content is a Python pickle" in error(await put(pickled, "tokenizer.model"))
        assert "does not match" not in error(await put(b"abc", "x.txt", sha="0" * 64)) and "not the declared" in error(
            await put(b"abc", "x.txt", sha="0" * 64)
        )
        assert "not a sha256 hex digest" in error(await put(b"abc", "x.txt", sha="xyz"))
        bad = raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4)
        assert "model.safetensors: tensor 'a': shape [3] of F32 needs 12 bytes" in error(
            await put(bad, "model.safetensors")
        )
        assert "not a relative path" in error(await put(b"x", "../x"))

        directory = make_checkpoint(tmp_path / "m", seed=0)
        files = await upload_dir(client, directory)

        def body(fs, name="tiny"):
            return PushModelRequest(name=name, files=fs).model_dump(mode="json")

        no_config = [f for f in files if f.path != "config.json"]
        assert "config.json: missing" in error(await client.post("/v1/models", json=body(no_config)))
        never_uploaded = files + [FileEntry(path="extra.json", sha256="1" * 64, size=3)]
        assert "extra.json: blob sha256:111" in error(await client.post("/v1/models", json=body(never_uploaded)))
        wrong_size = [f.model_copy(update={"size": f.size + 1}) if f.path == "tokenizer.json" else f for f in files]
        assert "tokenizer.json: listed as" in error(await client.post("/v1/models", json=body(wrong_size)))
        # a blob uploaded under an innocent name is still checked as the safetensors file it is listed as
        renamed = [
            f.model_copy(update={"path": "model.safetensors"})
            if f.path == "tokenizer.json"
            else f.model_copy(update={"path": "other.safetensors"})
            if f.path == "model.safetensors"
            else f
            for f in files
        ]
        assert "model.safetensors: " in error(await client.post("/v1/models", json=body(renamed)))
        bad_config = b'{"hidden_size": 4}'
        await put(bad_config, "config.json")
        swapped = [
            FileEntry(path="config.json", sha256=hashlib.sha256(bad_config).hexdigest(), size=len(bad_config))
            if f.path == "config.json"
            else f
            for f in files
        ]
        assert "config.json: names neither" in error(await client.post("/v1/models", json=body(swapped)))
        invalid = await client.post("/v1/models", json={"name": "no spaces allowed", "files": []})
        assert invalid.status_code == 422
        assert (await client.get("/v1/models")).json() == {"models": []}
