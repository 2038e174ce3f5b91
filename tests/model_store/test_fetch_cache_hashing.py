"""The fetch helper's check of cached blobs: every cached blob is hashed again, off the event loop."""

from __future__ import annotations

import hashlib
import threading

from shared import model_fetch as fetch


def _blob(blob_dir, content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    (blob_dir / digest).write_bytes(content)
    return digest


async def test_cached_blobs_are_rehashed_and_only_intact_ones_reused(tmp_path):
    good = _blob(tmp_path, b"weights" * 1000)
    bad = _blob(tmp_path, b"other weights")
    (tmp_path / bad).write_bytes(b"other weightz")  # flipped on disk after it was cached
    missing = hashlib.sha256(b"never fetched").hexdigest()
    assert await fetch._verified_cached(tmp_path, {good, bad, missing}) == {good}


async def test_cached_blobs_are_hashed_in_worker_threads(tmp_path, monkeypatch):
    digests = {_blob(tmp_path, bytes([i]) * 4096) for i in range(3)}
    threads: list[threading.Thread] = []
    real = fetch._sha256_file

    def recording(path):
        threads.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(fetch, "_sha256_file", recording)
    assert await fetch._verified_cached(tmp_path, digests) == digests
    assert len(threads) == 3 and threading.main_thread() not in threads


def test_sha256_file_matches_hashlib(tmp_path):
    content = bytes(range(256)) * 5000  # spans several read blocks
    (tmp_path / "f").write_bytes(content)
    assert fetch._sha256_file(tmp_path / "f") == hashlib.sha256(content).hexdigest()
