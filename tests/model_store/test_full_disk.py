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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from shared.blob_store import BlobStore
from services.model_store.client import StoreClient
from services.model_store.service_layer.ingest import Ingest
from services.model_store.service_layer.space import SpaceGuard
from shared import nats_auth
from shared.catalog import BLOB_BUCKET
from shared.errors import InsufficientStorage
from tests.model_store.conftest import LiveStore, make_checkpoint
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
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip(f"cannot mount a {DISK_MB} MB tmpfs to fill: no mount command here")
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
            nc = await nats.connect(
                self.nats.url_for(nats_auth.ADMIN), inbox_prefix=nats_auth.inbox_prefix(nats_auth.ADMIN)
            )
            try:
                return (await nc.jetstream().stream_info(BLOB_STREAM)).state.bytes
            finally:
                await nc.close()

        return asyncio.run(read())

    def nats_errors(self) -> list[str]:
        """What the report showed: a failed disk write, a refused permission (the purge), a fatal error.
        (A write refused at JetStream's own limit is logged too, as the refusal it is: not counted.)"""
        signs = ("write error", "no space left", "Violation", "[FTL]")
        return [line for line in self.nats.log.read_text().splitlines() if any(sign in line for sign in signs)]

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


def put_blob(store: LiveStore, path: Path, sha256: str, *, declared: bool = True) -> httpx.Response:
    """As `strata model push` uploads (streamed, with its content-length), or chunked without one."""

    def body() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(MB):
                yield block

    length = {"content-length": str(path.stat().st_size)} if declared else {}
    return httpx.put(
        f"{store.url}/v1/blobs/{sha256}",
        content=body(),
        timeout=60,
        headers={**length, "content-type": "application/octet-stream"},
    )


def assert_nothing_left_and_a_small_push_works(platform: Platform, stream_bytes: int, tmp_path: Path) -> None:
    assert platform.stream_bytes() == stream_bytes, "partial chunks stayed in the blob store"
    assert platform.spooled() == []
    assert platform.nats_errors() == []
    path, sha = random_file(tmp_path, "small.bin", 4 * MB)
    r = put_blob(platform.store, path, sha)
    assert r.status_code == 200, r.text[:300]
    download = httpx.get(f"{platform.store.url}/v1/blobs/{sha}", timeout=60)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == sha
    assert platform.nats_errors() == []


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
    assert_nothing_left_and_a_small_push_works(platform, before, tmp_path)


def test_an_upload_without_a_content_length_stops_before_the_disk_is_full(platform_on_small_disk, tmp_path):
    """Its size is known only as it arrives: the spool stops at the room it had, NATS never meets a full disk."""
    platform = platform_on_small_disk
    before = platform.stream_bytes()
    path, sha = random_file(tmp_path, "big.bin", 70 * MB)
    r = put_blob(platform.store, path, sha, declared=False)
    assert r.status_code == 507, (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == "insufficient_storage"
    assert "outgrew the" in r.json()["error"]["message"] and "bytes free" in r.json()["error"]["message"]
    path.unlink()
    assert_nothing_left_and_a_small_push_works(platform, before, tmp_path)


def test_a_push_past_the_blob_stores_jetstream_limit_is_refused_before_it_is_read(secured, tmp_path):
    asyncio.run(_limit_blob_stream(secured, 8 * MB))
    with LiveStore(secured.url_for("model-store"), tmp_path / "store-data") as store:
        path, sha = random_file(tmp_path, "big.bin", 12 * MB)
        r = put_blob(store, path, sha)
        assert r.status_code == 507, (r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert (
            message
            == f"not enough space for {12 * MB} bytes: the blob store's JetStream limits leave {8 * MB} bytes free"
        )
        path, sha = random_file(tmp_path, "fits.bin", 6 * MB)
        assert put_blob(store, path, sha).status_code == 200


def test_a_push_past_nats_servers_own_storage_limit_is_507_and_leaves_no_chunks(small_disk, tmp_path):
    """NATS alone on the small disk (its max_file_store: 75% of the free disk at start, which no client
    can read), model-store's data dir elsewhere: the put is refused part-way, its chunks purged."""
    server = SecuredNats(small_disk / "data").start().provision()
    try:
        with LiveStore(server.url_for("model-store"), tmp_path / "store-data") as store:
            platform = Platform(server, store, tmp_path / "store-data")
            stored = []
            for i in range(3):
                path, sha = random_file(tmp_path, f"part-{i}.bin", 20 * MB)
                r = put_blob(store, path, sha)
                if r.status_code != 200:
                    break
                stored.append(platform.stream_bytes())
            assert len(stored) == 2 and r.status_code == 507, (stored, r.status_code, r.text[:300])
            assert "JetStream refused it part-way" in r.json()["error"]["message"]
            assert_nothing_left_and_a_small_push_works(platform, stored[-1], tmp_path)
    finally:
        server.stop()


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


async def test_a_spool_that_meets_a_disk_filled_by_others_is_refused_with_507(small_disk):
    """The room check passed (here: a guard that keeps no reserve and sees room), then the disk filled."""
    spool_dir = small_disk / "tmp"
    spool_dir.mkdir()
    space = SpaceGuard(spool_dir, None, _no_jetstream_limit, reserve=-(1 << 40))
    ingest = Ingest(kv=None, blobs=None, tmp_dir=spool_dir, space=space)  # type: ignore[arg-type]  # never reached

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(DISK_MB + 8):
            yield os.urandom(MB)

    with pytest.raises(InsufficientStorage) as refused:
        await ingest.upload("0" * 64, chunks())
    assert "the disk of model-store's spool filled up after" in refused.value.message
    assert list(spool_dir.iterdir()) == []


async def _no_jetstream_limit() -> None:
    return None


def test_a_model_push_too_big_for_the_disk_says_so_and_the_next_push_registers(platform_on_small_disk, tmp_path):
    """What `strata model push` meets (services/model_store/client.py): the typed 507, then a push that fits."""
    platform = platform_on_small_disk
    model = make_checkpoint(tmp_path / "model")
    weights, _ = random_file(model, "model-big.safetensors", 36 * MB)
    client = StoreClient(platform.store.url)
    try:
        with pytest.raises(InsufficientStorage) as refused:
            client.push_model(model, "tiny")
        assert f"not enough space for {36 * MB} bytes" in refused.value.message
        weights.unlink()
        pushed = client.push_model(model, "tiny")
        assert pushed.created and pushed.model.version == 1
    finally:
        client.close()
    assert platform.nats_errors() == []
