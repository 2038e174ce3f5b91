"""A full disk must not wedge model pushes (#20 item 3).

As reported: with the data dir on a 64 MB tmpfs, a 36 MB push made nats-server log a critical write
error; model-store's cleanup purge was refused (no permission) and about 25 MB of partial chunks
stayed; later pushes failed with a bare 500 until NATS restarted, and a 102 MB push answered a bare
"Internal Server Error" page. Here the same data dir layout as `strata up` (NATS' store under
``<data_dir>/nats``, model-store's spool under ``<data_dir>/model-store``) sits on a small tmpfs and
NATS runs with the generated per-role permissions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from services.model_store.adapters.blobs import BlobStore
from shared import nats_auth
from shared.catalog import BLOB_BUCKET
from shared.errors import InsufficientStorage
from tests.model_store.conftest import LiveStore
from tests.security.conftest import SecuredNats

pytestmark = pytest.mark.timeout(180)
MB = 1024 * 1024
DISK_MB = 64
BLOB_STREAM = nats_auth.obj_stream(BLOB_BUCKET)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB tmpfs (root may mount one); skipped, saying why, where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {DISK_MB} MB tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


@dataclass
class Platform:
    nats: SecuredNats
    store: LiveStore
    data_dir: Path

    def stream_bytes(self) -> int:
        """The blob store's bytes in JetStream, read with the admin credential."""
        async def read() -> int:
            nc = await nats.connect(self.nats.url_for(nats_auth.ADMIN), inbox_prefix=nats_auth.inbox_prefix(nats_auth.ADMIN))
            try:
                return (await nc.jetstream().stream_info(BLOB_STREAM)).state.bytes
            finally:
                await nc.close()

        return asyncio.run(read())

    def nats_errors(self) -> list[str]:
        return [line for line in self.nats.log.read_text().splitlines() if "[ERR]" in line or "[FTL]" in line]

    def spooled(self) -> list[Path]:
        return [p for p in (self.data_dir / "model-store" / "tmp").iterdir()]


@pytest.fixture
def platform_on_small_disk(small_disk: Path) -> Iterator[Platform]:
    data_dir = small_disk / "data"
    server = SecuredNats(data_dir).start().provision()
    try:
        with LiveStore(server.url_for("model-store"), data_dir) as store:
            yield Platform(server, store, data_dir)
    finally:
        server.stop()


def random_file(directory: Path, name: str, size: int) -> tuple[Path, str]:
    path = directory / name
    with path.open("wb") as f:
        for _ in range(size // MB):
            f.write(os.urandom(MB))
        f.write(os.urandom(size % MB))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def put_blob(store: LiveStore, path: Path, sha256: str) -> httpx.Response:
    def body() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(MB):
                yield block

    return httpx.put(f"{store.url}/v1/blobs/{sha256}", content=body(), timeout=60,
                     headers={"content-length": str(path.stat().st_size), "content-type": "application/octet-stream"})


def test_a_push_the_disk_cannot_hold_is_refused_with_507_and_the_store_stays_usable(platform_on_small_disk, tmp_path):
    platform = platform_on_small_disk
    before = platform.stream_bytes()

    for size in (36 * MB, 102 * MB):
        path, sha = random_file(tmp_path, f"big-{size}.bin", size)
        r = put_blob(platform.store, path, sha)
        assert r.status_code == 507, (size, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert f"{size} bytes" in error["message"] and "free" in error["message"], error["message"]
        path.unlink()

    assert platform.stream_bytes() == before, "partial chunks stayed in the blob store"
    assert platform.spooled() == []
    assert platform.nats_errors() == []

    path, sha = random_file(tmp_path, "small.bin", 4 * MB)
    r = put_blob(platform.store, path, sha)
    assert r.status_code == 200, r.text[:300]
    download = httpx.get(f"{platform.store.url}/v1/blobs/{sha}", timeout=60)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == sha
    assert platform.nats_errors() == []


# -- a put that JetStream refuses part-way (past the room check, e.g. a limit it cannot see) --------
@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredNats]:
    server = SecuredNats(tmp_path / "data").start().provision()
    try:
        yield server
    finally:
        server.stop()


async def _limit_blob_stream(server: SecuredNats, max_bytes: int) -> None:
    nc = await nats.connect(server.url_for(nats_auth.ADMIN), inbox_prefix=nats_auth.inbox_prefix(nats_auth.ADMIN))
    try:
        js = nc.jetstream()
        config = (await js.stream_info(BLOB_STREAM)).config
        await js.update_stream(dataclasses.replace(config, max_bytes=max_bytes))
    finally:
        await nc.close()


async def test_a_put_refused_part_way_leaves_no_chunks_and_the_store_takes_the_next(secured, tmp_path):
    """model-store's own credential purges the partial chunks (the cleanup nats-py's put does on failure)."""
    await _limit_blob_stream(secured, 8 * MB)
    nc = await nats.connect(secured.url_for("model-store"), inbox_prefix=nats_auth.inbox_prefix("model-store"))
    try:
        js = nc.jetstream()
        blobs = await BlobStore.open(js)
        big, big_sha = random_file(tmp_path, "big.bin", 12 * MB)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(InsufficientStorage) as refused:
            await blobs.put_path(big_sha, big)
        assert loop.time() - started < 4, "the cleanup waited for a refused purge to time out"
        assert "maximum bytes exceeded" in refused.value.message
        assert (await js.stream_info(BLOB_STREAM)).state.bytes == 0, "partial chunks stayed"

        small, small_sha = random_file(tmp_path, "small.bin", 2 * MB)
        assert await blobs.put_path(small_sha, small) == 2 * MB
        assert await blobs.check(small_sha) == 2 * MB
        assert await blobs.delete(small_sha)
        # what stays is the delete marker (the object's meta), not its chunks
        assert (await js.stream_info(BLOB_STREAM)).state.bytes < 4096
    finally:
        await nc.close()
