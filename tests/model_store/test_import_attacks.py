"""`strata model import` against a hostile or changing local cache: what the import checked is what
model-store stores, or nothing is stored; a malformed layer is a clear error, not a traceback or a
memory blowup."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("gguf")

from services.model_store.client import StoreClient  # noqa: E402
from services.model_store.imports.huggingface import read_huggingface  # noqa: E402
from shared.errors import Invalid  # noqa: E402
from tests.model_store.conftest import make_checkpoint  # noqa: E402
from tests.model_store.test_imports import assert_nothing_stored  # noqa: E402
from tests.support.local_caches import make_hf_snapshot  # noqa: E402


def test_a_git_blob_swapped_after_its_check_is_refused_by_the_store(live_store, tmp_path):
    """config.json and the tokenizer are git blobs (checked by their sha1): one rewritten between the
    import's check and the upload must not be stored under a source that names the checked sha1."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    cache = tmp_path / "hf" / "hub"
    snapshot, _ = make_hf_snapshot(cache, "acme/tiny", files)
    plan = read_huggingface("acme/tiny", cache=cache)
    assert plan.source.digests["config.json"].startswith("git-sha1:")
    swapped = json.dumps({**json.loads(files["config.json"]), "num_hidden_layers": 99}).encode()
    (snapshot / "config.json").resolve().write_bytes(swapped)  # another process rewrites the blob
    with pytest.raises(Invalid, match="not the declared"):
        StoreClient(live_store.url).push_model(plan.directory, plan.name, files=plan.files, source=plan.source,
                                               known_sha256=plan.checked_sha256)
    assert_nothing_stored(live_store.url, swapped)
    assert plan.checked_sha256["config.json"] == hashlib.sha256(files["config.json"]).hexdigest()


@pytest.mark.parametrize("case, params, expect", [
    ("deeply nested", b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ("huge", b'{"stop": ["' + b"x" * (2 * 1024 * 1024) + b'"]}', "too large"),
])
def test_a_hostile_params_layer_is_a_clear_error_and_stores_nothing(
    live_store, tmp_path, capsys, monkeypatch, case, params, expect
):
    from cli.main import main
    from tests.support.gguf_model import write_random_gguf
    from tests.support.local_caches import make_ollama_model

    gguf_bytes = write_random_gguf(tmp_path / "tiny.gguf", "f16").read_bytes()
    root = tmp_path / "ollama"
    make_ollama_model(root, "tiny", "latest", {"model": gguf_bytes, "params": params})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    code = main(["model", "import", "ollama:tiny", "--url", live_store.url])
    err = capsys.readouterr().err
    assert code == 1 and "params layer" in err and expect in err, err
    assert_nothing_stored(live_store.url, gguf_bytes, params)


def test_cache_layouts_that_point_outside_the_cache_are_refused(tmp_path):
    """Names, tags, revisions and links that would reach outside the caches' own blobs: each a clear error."""
    import os

    from services.model_store.imports.ollama import read_ollama
    from shared.errors import NotFound, StrataError
    from tests.support.local_caches import make_ollama_model

    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    root = tmp_path / "ollama"
    make_ollama_model(root, "tiny", "latest", {"model": b"GGUF"})
    for ref in ("../../x", "tiny:../../x", "tiny:..", "a/b/c/d", "tiny:\x00", "/etc/passwd", "tiny\n", "tiny:latest\n"):
        with pytest.raises(Invalid, match="expected ollama:NAME"):
            read_ollama(ref, tmp_path / "staging", root)
    cache = tmp_path / "hf" / "hub"
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=4)
    snapshot, commit = make_hf_snapshot(cache, "acme/tiny", {p.name: p.read_bytes() for p in ckpt.iterdir()})
    for ref in (
        "acme/tiny@main/../../../x",
        "../acme@main",
        "acme/tiny/x",
        "acme/tiny@/etc",
        "acme/tiny\n",
        "acme/tiny@main\n",
    ):
        with pytest.raises(Invalid, match="expected hf:ORG/NAME"):
            read_huggingface(ref, cache=cache)
    (cache / "models--acme--tiny" / "refs" / "evil").write_text("../../../../secret")
    with pytest.raises(NotFound, match="has no snapshot of it"):
        read_huggingface("acme/tiny@evil", cache=cache)
    weights = snapshot / "model.safetensors"
    weights.unlink()
    weights.symlink_to(os.path.relpath(secret, weights.parent))  # a snapshot link out of blobs/
    with pytest.raises(StrataError, match="not a link into the cache's blobs/"):
        read_huggingface("acme/tiny", cache=cache)


def test_an_oversized_ollama_manifest_is_refused_before_it_is_read(tmp_path):
    """A manifest is a few hundred bytes; a huge file in its place (a hostile or shared models directory)
    is refused by its size, not read into memory."""
    from services.model_store.imports.ollama import MAX_MANIFEST_BYTES, read_ollama
    from tests.support.local_caches import make_ollama_model

    root = tmp_path / "ollama"
    manifest = make_ollama_model(root, "tiny", "latest", {"model": b"GGUF"})
    with manifest.open("r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    with pytest.raises(Invalid, match=f"is too large for an Ollama manifest \\({MAX_MANIFEST_BYTES + 1} bytes"):
        read_ollama("tiny", tmp_path / "staging", root)


def test_an_ollama_license_title_carries_no_terminal_escapes(live_store, tmp_path, capsys, monkeypatch):
    """The license layer is the model author's text (pulled from a registry): its first line becomes the
    manifest's license field, which `strata model show` prints, so control characters are left out of it
    (the whole text is still the LICENSE file, byte for byte)."""
    from cli.main import main
    from tests.support.gguf_model import write_random_gguf
    from tests.support.local_caches import make_ollama_model

    gguf_bytes = write_random_gguf(tmp_path / "tiny.gguf", "f16").read_bytes()
    license_text = b"\x1b[2J\x1b]8;;http://evil.example\x07FREE LICENSE\x1b]8;;\x07\r\n\nterms\n"
    root = tmp_path / "ollama"
    make_ollama_model(root, "tiny", "latest", {"model": gguf_bytes, "license": license_text})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert main(["model", "import", "ollama:tiny", "--url", live_store.url]) == 0, capsys.readouterr().err
    manifest = StoreClient(live_store.url).resolve("tiny").manifest
    assert manifest.license == "[2J]8;;http://evil.exampleFREE LICENSE]8;;"
    assert main(["model", "show", "tiny", "--url", live_store.url]) == 0
    assert "\x1b" not in capsys.readouterr().out
    assert "LICENSE" in {f.path for f in manifest.files}


def test_a_ref_file_that_is_no_commit_is_neither_read_whole_nor_echoed(tmp_path):
    """refs/<revision> holds a 40-hex commit: one that names a large file (or a secret) is refused
    without reading it all, and the error quotes only its start."""
    from shared.errors import NotFound

    cache = tmp_path / "hf" / "hub"
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5)
    make_hf_snapshot(cache, "acme/tiny", {p.name: p.read_bytes() for p in ckpt.iterdir()})
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "A" * 70 + "\nTHE-SECRET-PART\n" + "B" * 10_000_000)
    (cache / "models--acme--tiny" / "refs" / "evil").symlink_to(secret)
    with pytest.raises(NotFound) as caught:
        read_huggingface("acme/tiny@evil", cache=cache)
    assert "THE-SECRET-PART" not in caught.value.message and len(caught.value.message) < 400
