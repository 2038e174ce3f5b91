"""The one Ed25519 key store (shared/signing_keys.py) and the one key id, used by model-store and the ledger."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.model_store.domain.signing import Signer
from services.provenance_ledger.adapters.keys import load_or_create_key
from shared.signing_keys import KeyFileError, key_id, load_or_create_private_key, short_key_id


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


LOADERS = {
    "shared": lambda d: load_or_create_private_key(d / "key.pem"),
    "model-store": lambda d: Signer.load_or_create(d / "signing-key.pem")._private,
    "ledger": load_or_create_key,
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_two_starts_at_once_end_with_the_same_key(tmp_path, monkeypatch, loader):
    """The first start is held just after it opened its new key file, before writing a byte (where a
    slow disk or a preempted process leaves it); the second start runs through meanwhile. Both must
    end with one and the same key: not an error on an empty file, not a collision, not two keys."""
    real_fdopen, first = os.fdopen, threading.Event()
    held, second_done = threading.Event(), threading.Event()

    def fdopen(fd, *args, **kwargs):
        if not first.is_set():
            first.set()
            held.set()
            second_done.wait(10)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    results: dict[str, object] = {}

    def start(name: str) -> None:
        try:
            results[name] = _raw(loader(tmp_path))
        except Exception as exc:  # noqa: BLE001 -- the outcome under test
            results[name] = exc

    a = threading.Thread(target=start, args=("a",))
    a.start()
    assert held.wait(10)
    start("b")
    second_done.set()
    a.join(10)
    assert isinstance(results["a"], bytes) and results["a"] == results["b"], results


def test_many_processes_at_once_end_with_the_same_key(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            keys = pool.map(_start_after, [(tmp_path / "key.pem", barrier)] * 4)
    assert len(set(keys)) == 1


def _start_after(args: tuple[Path, object]) -> bytes:
    path, barrier = args
    barrier.wait()
    return _raw(load_or_create_private_key(path))


def test_the_key_file_is_private_and_kept(tmp_path):
    path = tmp_path / "key.pem"
    key = load_or_create_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert _raw(load_or_create_private_key(path)) == _raw(key)
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp file left behind


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "key.pem"
    load_or_create_private_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_private_key(path)


@pytest.mark.parametrize("content", [b"", b"-----BEGIN PRIVATE KEY-----\ntorn", b"not a key at all"])
def test_a_corrupt_key_file_is_a_clear_error_and_is_not_replaced(tmp_path, content):
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{path}: not a PEM Ed25519 private key"):
        load_or_create_private_key(path)
    assert path.read_bytes() == content


# A fixed key: both id formats are on the wire and in stored data (DSSE keyid in signed models, the ledger's
# tree heads and its key events), so each is pinned to the value it has always had.
FIXED = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()


def test_key_id_is_the_full_sha256_of_the_raw_public_key():
    assert key_id(FIXED) == "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"


def test_short_key_id_is_its_first_16_bytes():
    assert short_key_id(FIXED) == "56475aa75463474c0285df5dbf2bcab7"
