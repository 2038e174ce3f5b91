"""#20 item 4: a blob whose stored chunks no longer match the Object Store's own record of it (a lost
or changed chunk message) is reported as "blob sha256:... is corrupt in the store" on every path: the
adapter (at once, not as a 20 s "no data" outage), the worker's fetch, the HTTP download (which never
answers a short 200) and `strata model verify` (which does not blame HTTPS)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os

import httpx
import nats
import pytest

from cli.main import main
from shared.errors import StrataError
from shared.blob_store import BlobStore
from services.model_store.client import StoreClient
from shared.model_fetch import fetch_model
from tests.model_store.conftest import change_last_chunk, lose_chunk, make_checkpoint
from tests.model_store.test_verify_fetch import http, pushed
from tests.support.helpers import make_service

BIG = os.urandom(300_000)  # three Object Store chunks of 128 KiB
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def corrupt(sha256: str) -> str:
    return f"blob sha256:{sha256} is corrupt in the store"


async def put_big(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await (await BlobStore.open(nc.jetstream(), create=True)).put_file(BIG_SHA, io.BytesIO(BIG))
    finally:
        await nc.close()


async def read_all(nats_url: str) -> list[bytes]:
    """The blob's chunks as BlobStore yields them; what arrived before an error is kept on it."""
    received: list[bytes] = []
    nc = await nats.connect(nats_url)
    try:
        async for chunk in (await BlobStore.open(nc.jetstream())).chunks(BIG_SHA):
            received.append(chunk)
    except StrataError as exc:
        exc.received = received  # type: ignore[attr-defined]
        raise
    finally:
        await nc.close()
    return received


async def test_a_lost_chunk_is_corrupt_at_once_not_a_20s_outage(nats_server):
    await put_big(nats_server.url)
    assert b"".join(await read_all(nats_server.url)) == BIG
    await lose_chunk(nats_server.url, BIG_SHA, index=1)
    with pytest.raises(StrataError, match=corrupt(BIG_SHA)) as caught:
        await asyncio.wait_for(read_all(nats_server.url), timeout=5)
    assert caught.value.code == "blob_corrupt" and "3 chunks" in caught.value.message
    assert caught.value.received == []  # type: ignore[attr-defined]


async def test_a_changed_chunk_is_corrupt_and_the_blob_is_never_handed_out_whole(nats_server):
    await put_big(nats_server.url)
    await change_last_chunk(nats_server.url, BIG_SHA)
    with pytest.raises(StrataError, match=corrupt(BIG_SHA)) as caught:
        await asyncio.wait_for(read_all(nats_server.url), timeout=5)
    assert caught.value.code == "blob_corrupt" and "digest" in caught.value.message
    assert sum(map(len, caught.value.received)) < len(BIG)  # type: ignore[attr-defined]


async def test_fetch_model_fails_with_the_corrupt_blob_named(nats_server, tmp_path):
    service = make_service("model-store", nats_server.url, tmp_path / "data")
    async with service.running(), http(service) as client:
        model = await pushed(client, make_checkpoint(tmp_path / "src", seed=1))
        weights = next(f for f in model.manifest.files if f.path == "model.safetensors")
        await lose_chunk(nats_server.url, weights.sha256)
        nc = await nats.connect(nats_server.url)
        try:
            with pytest.raises(StrataError, match=corrupt(weights.sha256)) as caught:
                await asyncio.wait_for(fetch_model(nc, "tiny", tmp_path / "cache"), timeout=5)
            assert caught.value.code == "blob_corrupt"
        finally:
            await nc.close()


def test_http_download_of_a_corrupt_blob_is_an_error_never_a_short_200(live_store):
    asyncio.run(put_big(live_store.nats_url))
    asyncio.run(change_last_chunk(live_store.nats_url, BIG_SHA))
    # the body has started when the digest fails: the connection ends short of content-length
    with httpx.Client(base_url=live_store.url, timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("GET", f"/v1/blobs/{BIG_SHA}") as response:
                assert response.status_code == 200
                response.read()
        check = client.get(f"/v1/blobs/{BIG_SHA}/check")
        assert check.status_code == 500 and check.json()["error"]["code"] == "blob_corrupt"
        assert corrupt(BIG_SHA) in check.json()["error"]["message"]

    # the client library learns why from that check, rather than guessing at HTTPS
    with pytest.raises(StrataError, match=corrupt(BIG_SHA)):
        b"".join(StoreClient(live_store.url).blob_chunks(BIG_SHA))

    # found before the body starts (a chunk is missing): a typed error answer
    asyncio.run(lose_chunk(live_store.nats_url, BIG_SHA, index=0))
    response = httpx.get(f"{live_store.url}/v1/blobs/{BIG_SHA}", timeout=10)
    assert response.status_code == 500 and response.json()["error"]["code"] == "blob_corrupt"


def test_strata_model_verify_says_the_blob_is_corrupt_in_the_store(live_store, tmp_path, capsys):
    url = ("--url", live_store.url)
    source = make_checkpoint(tmp_path / "ckpt", seed=4, extra={"notes.txt": os.urandom(200_000).hex()})
    assert main(["model", "push", str(source), "--name", "tiny", *url]) == 0
    capsys.readouterr()
    assert main(["model", "show", "tiny:1", "--json", *url]) == 0
    files = json.loads(capsys.readouterr().out)["manifest"]["files"]
    notes = next(f["sha256"] for f in files if f["path"] == "notes.txt")
    weights = next(f["sha256"] for f in files if f["path"] == "model.safetensors")
    asyncio.run(change_last_chunk(live_store.nats_url, notes))  # found mid-body: the download is aborted
    asyncio.run(lose_chunk(live_store.nats_url, weights))  # found before the body: an error answer

    assert main(["model", "verify", "tiny:1", *url]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"notes.txt: {corrupt(notes)}" in " ".join(err.split())
    assert f"model.safetensors: {corrupt(weights)}" in " ".join(err.split())
    assert "https" not in err.lower()
