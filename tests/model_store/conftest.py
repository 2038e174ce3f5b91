"""Fixtures for model-store tests: tiny safetensors checkpoints made here (no model hub), the
service in-process against the real nats-server, and the service behind real uvicorn."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import numpy as np
import pytest
import uvicorn
from nats.js.api import AckPolicy, ConsumerConfig
from safetensors.numpy import save_file

from cli.natsd import free_port
from shared.catalog import BLOB_BUCKET, FileEntry
from tests.support.helpers import make_service

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32,
    "max_position_embeddings": 64, "tie_word_embeddings": False, "torch_dtype": "float32",
}


@pytest.fixture(autouse=True)
def _no_builtin(monkeypatch):
    """The built-in model is registered only where a test asks for it."""
    monkeypatch.setenv("STRATA_MODEL_STORE_BUILTIN", "0")


def make_checkpoint(
    directory: Path, seed: int = 0, *, extra: dict[str, str] | None = None, config: dict | None = None
) -> Path:
    """A tiny random-weight checkpoint; ``config`` overrides keys of CONFIG (e.g. its architectures)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "model.embed_tokens.weight": rng.standard_normal((32, 8)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float16),
            "lm_head.weight": rng.standard_normal((32, 8)).astype(np.float32),
        },
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(json.dumps({**CONFIG, **(config or {})}))
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    return directory


def file_entries(directory: Path) -> list[FileEntry]:
    return [
        FileEntry(
            path=p.relative_to(directory).as_posix(),
            sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
            size=p.stat().st_size,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    ]


async def upload_dir(client: httpx.AsyncClient, directory: Path) -> list[FileEntry]:
    entries = file_entries(directory)
    for entry in entries:
        r = await client.put(
            f"/v1/blobs/{entry.sha256}", params={"path": entry.path}, content=(directory / entry.path).read_bytes()
        )
        assert r.status_code == 200, r.text
    return entries


class LiveStore:
    """model-store served by real uvicorn in a thread (its own event loop), as `strata up` runs it."""

    def __init__(self, nats_url: str, data_dir: Path) -> None:
        self.nats_url = nats_url
        self.service = make_service("model-store", nats_url, data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.service.http, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> LiveStore:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("model-store did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def live_store(nats_server, tmp_path) -> Iterator[LiveStore]:
    with LiveStore(nats_server.url, tmp_path / "store-data") as store:
        yield store


async def chunk_messages(js, sha256: str, bucket: str = BLOB_BUCKET) -> tuple[str, str, list[int]]:
    """The Object Store's stream, the blob's chunk subject and the stream sequence of each chunk message."""
    store = await js.object_store(bucket)
    info = await store.get_info(sha256)
    stream, subject = f"OBJ_{bucket}", f"$O.{bucket}.C.{info.nuid}"
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
    try:
        msgs = await sub.fetch(info.chunks, timeout=5)
    finally:
        await sub.unsubscribe()
    return stream, subject, [m.metadata.sequence.stream for m in msgs]


async def lose_chunk(nats_url: str, sha256: str, index: int = 0) -> None:
    """A chunk message of the blob is gone (as after a lost disk block): fewer chunks than its record says."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream, _, seqs = await chunk_messages(js, sha256)
        await js.delete_msg(stream, seqs[index])
    finally:
        await nc.close()


async def change_last_chunk(nats_url: str, sha256: str) -> None:
    """The blob's last chunk holds other bytes of the same length: the count and size still match its
    record, only the digest tells."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream, subject, seqs = await chunk_messages(js, sha256)
        last = await js.get_msg(stream, seqs[-1])
        await js.delete_msg(stream, seqs[-1])
        await js.publish(subject, bytes(b ^ 0xFF for b in last.data), stream=stream)
    finally:
        await nc.close()
