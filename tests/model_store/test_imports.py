"""`strata model import`: an Ollama model and Hugging Face hub snapshots (safetensors and GGUF), from
layouts the tests build, pushed through model-store with where they came from in the signed manifest;
every failure is a clear error and leaves nothing in the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gguf")

from cli.main import main  # noqa: E402
from services.model_store.client import StoreClient  # noqa: E402
from tests.model_store.conftest import make_checkpoint  # noqa: E402
from tests.support.gguf_model import CHAT_TEMPLATE, write_random_gguf  # noqa: E402
from tests.support.local_caches import make_hf_snapshot, make_ollama_model  # noqa: E402

TEMPLATE = b"{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"
PARAMS = b'{"stop": ["<|eos|>"], "temperature": 0.6}'
LICENSE = b"TINY LLAMA COMMUNITY LICENSE\n\nYou may use it for tests.\n"


def strata(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_random_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f16").read_bytes()


def assert_nothing_stored(store_url: str, *contents: bytes) -> None:
    assert StoreClient(store_url).list_models().models == []
    for data in contents:
        head = httpx.head(f"{store_url}/v1/blobs/{hashlib.sha256(data).hexdigest()}")
        assert head.status_code == 404, "a blob was uploaded before the import failed"


def test_an_ollama_model_is_imported_with_its_layers_and_source(live_store, tmp_path, capsys, monkeypatch, gguf_bytes):
    root = tmp_path / "ollama"
    manifest = make_ollama_model(root, "tiny", "q8", {"model": gguf_bytes, "template": TEMPLATE, "params": PARAMS,
                                                       "license": LICENSE, "system": b"You are tiny."})
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    url = ("--url", live_store.url)
    from services.model_store import client as client_module

    hashed_again, sha256_file = [], client_module.sha256_file
    monkeypatch.setattr(client_module, "sha256_file", lambda path, progress=None: hashed_again.append(path.name))
    code, out, err = strata(capsys, "model", "import", "ollama:tiny:q8", *url)
    assert code == 0, err
    assert hashed_again == []  # each layer was hashed once, when it was checked against its digest
    monkeypatch.setattr(client_module, "sha256_file", sha256_file)
    assert out.startswith("imported tiny-q8:1 sha256:") and "from ollama:tiny:q8" in out

    resolved = StoreClient(live_store.url).resolve("tiny-q8:1")
    m = resolved.manifest
    assert {f.path: f.sha256 for f in m.files} == {
        "model.gguf": hashlib.sha256(gguf_bytes).hexdigest(), "ollama/template": hashlib.sha256(TEMPLATE).hexdigest(),
        "ollama/params.json": hashlib.sha256(PARAMS).hexdigest(), "LICENSE": hashlib.sha256(LICENSE).hexdigest(),
        "ollama/system": hashlib.sha256(b"You are tiny.").hexdigest()}
    assert (m.metadata.format, m.metadata.architecture, m.metadata.chat_template) == ("gguf", "llama", CHAT_TEMPLATE)
    assert m.license == "TINY LLAMA COMMUNITY LICENSE"
    src = m.source
    assert (src.kind, src.name, src.reference) == ("ollama", "registry.ollama.ai/library/tiny", "q8")
    assert src.digests["manifest"] == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert src.digests["model.gguf"] == "sha256:" + hashlib.sha256(gguf_bytes).hexdigest()
    # the source is signed with the rest: a pull verifies it, and importing again is the same version
    code, out, _ = strata(capsys, "model", "pull", "tiny-q8:1", str(tmp_path / "pulled"), *url)
    assert code == 0 and (tmp_path / "pulled" / "ollama" / "params.json").read_bytes() == PARAMS
    code, out, _ = strata(capsys, "model", "import", "ollama:tiny:q8", *url)
    assert code == 0 and out.startswith("already imported as tiny-q8:1")
    code, out, _ = strata(capsys, "model", "show", "tiny-q8", *url)
    assert code == 0 and "source: ollama registry.ollama.ai/library/tiny q8" in out
    # the default tag is latest, and --name names it
    make_ollama_model(root, "tiny", "latest", {"model": gguf_bytes})
    code, out, _ = strata(capsys, "model", "import", "ollama:tiny", "--name", "mine", *url)
    assert code == 0 and out.startswith("imported mine:1")
    assert StoreClient(live_store.url).resolve("mine").manifest.source.reference == "latest"


def _corrupt(root: Path, data: bytes) -> None:
    blob = root / "blobs" / ("sha256-" + hashlib.sha256(data).hexdigest())
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF
    blob.write_bytes(bytes(raw))


@pytest.mark.parametrize("case, ref, expect", [
    ("unknown name", "ollama:nosuch", "not_found"),
    ("unknown tag", "ollama:tiny:v9", "its tags here: latest"),
    ("bad digest", "ollama:tiny", "hashes to sha256:"),
    ("missing blob", "ollama:tiny", "is missing"),
    ("no gguf layer", "ollama:tiny", "has 0 layers of type application/vnd.ollama.image.model"),
    ("bad params", "ollama:tiny", "params layer"),
    ("projector", "ollama:tiny", "application/vnd.ollama.image.projector, which Strata cannot serve"),
    ("not a manifest", "ollama:tiny", "is not an Ollama manifest"),
    ("bad name", "ollama:../etc", "expected ollama:NAME[:TAG]"),
    ("bad store name", "ollama:tiny --name=-x", "model name '-x': expected letters"),
])
def test_an_ollama_import_that_cannot_be_checked_stores_nothing(live_store, tmp_path, capsys, monkeypatch, gguf_bytes,
                                                                case, ref, expect):
    root = tmp_path / "ollama"
    layers = {"model": gguf_bytes, "template": TEMPLATE, "params": PARAMS}
    if case == "no gguf layer":
        del layers["model"]
    if case == "bad params":
        layers["params"] = b"temperature: hot"
    if case == "projector":
        layers["projector"] = b"clip weights"
    manifest = make_ollama_model(root, "tiny", "latest", layers)
    if case == "bad digest":
        _corrupt(root, TEMPLATE)  # the GGUF is fine: checking happens before any upload
    if case == "missing blob":
        (root / "blobs" / ("sha256-" + hashlib.sha256(PARAMS).hexdigest())).unlink()
    if case == "not a manifest":
        manifest.write_text(json.dumps({"layers": "none"}))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    code, out, err = strata(capsys, "model", "import", *ref.split(), "--url", live_store.url)
    assert code == 1 and expect in err, err
    assert_nothing_stored(live_store.url, gguf_bytes, TEMPLATE)


def _hf_checkpoint_files(tmp_path: Path) -> dict[str, bytes]:
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=2, extra={"tokenizer_config.json": '{"bos_token": "<s>"}'})
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    files["pytorch_model.bin"] = b"\x80\x04pickled"  # an old-style copy beside the safetensors: left out
    files["README.md"] = b"# tiny\n"
    return files


def test_a_hugging_face_safetensors_snapshot_is_imported_with_its_revision(live_store, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    files = _hf_checkpoint_files(tmp_path)
    snapshot, commit = make_hf_snapshot(cache, "acme/tiny-chat", files, refs=("main", "v1.0"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    url = ("--url", live_store.url)
    code, out, err = strata(capsys, "model", "import", "hf:acme/tiny-chat", *url)
    assert code == 0 and out.startswith("imported tiny-chat:1"), err
    assert "left out (pickle): pytorch_model.bin" in err
    m = StoreClient(live_store.url).resolve("tiny-chat:1").manifest
    assert sorted(f.path for f in m.files) == [
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    assert m.metadata.architecture == "LlamaForCausalLM" and m.metadata.format is None
    src = m.source
    assert (src.kind, src.name, src.reference, src.resolved) == ("huggingface", "acme/tiny-chat", "main", commit)
    assert src.digests["model.safetensors"] == "sha256:" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert src.digests["config.json"].startswith("git-sha1:") and len(src.digests["config.json"]) == 9 + 40
    # a tag and the commit itself name the same snapshot; the revision asked for is what differs
    for rev in ("v1.0", commit):
        code, out, err = strata(capsys, "model", "import", f"hf:acme/tiny-chat@{rev}", *url)
        assert code == 0, err
    versions = StoreClient(live_store.url).list_models("tiny-chat").models
    assert [
        StoreClient(live_store.url).resolve(f"tiny-chat:{v.model.version}").manifest.source.reference for v in versions
    ] == ["main", "v1.0", commit]


def test_a_hugging_face_gguf_repository_is_imported_and_several_ggufs_need_file(
    live_store, tmp_path, capsys, monkeypatch, gguf_bytes
):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_hf_snapshot(cache, "acme/tiny-GGUF", {"tiny.F16.gguf": gguf_bytes, "README.md": b"# gguf\n"})
    url = ("--url", live_store.url)
    code, out, err = strata(capsys, "model", "import", "hf:acme/tiny-GGUF", "--name", "tiny-gguf", *url)
    assert code == 0, err
    m = StoreClient(live_store.url).resolve("tiny-gguf").manifest
    assert [f.path for f in m.files] == ["tiny.F16.gguf"] and m.metadata.quantization == "F16"
    assert m.source.digests == {"tiny.F16.gguf": "sha256:" + hashlib.sha256(gguf_bytes).hexdigest()}

    other = gguf_bytes[:-1] + bytes([gguf_bytes[-1] ^ 1])
    make_hf_snapshot(cache, "acme/two-GGUF", {"a.gguf": gguf_bytes, "b.gguf": other})
    code, _, err = strata(capsys, "model", "import", "hf:acme/two-GGUF", *url)
    assert code == 1 and "has 2 GGUF files; pick one with --file (a.gguf, b.gguf)" in err
    code, _, err = strata(capsys, "model", "import", "hf:acme/two-GGUF", "--file", "c.gguf", *url)
    assert code == 1 and "--file c.gguf is not a .gguf of the snapshot" in err
    code, out, err = strata(capsys, "model", "import", "hf:acme/two-GGUF", "--file", "b.gguf", *url)
    assert code == 0 and out.startswith("imported two-GGUF:1"), err
    assert [f.path for f in StoreClient(live_store.url).resolve("two-GGUF").manifest.files] == ["b.gguf"]


@pytest.mark.parametrize(
    "case, ref, expect",
    [
        ("unknown repo", "hf:acme/nosuch", "not in the Hugging Face cache"),
        ("unknown revision", "hf:acme/tiny@v9", "no such revision in the cache (refs here: main)"),
        ("corrupt lfs blob", "hf:acme/tiny", "hashes to sha256:"),
        ("corrupt git blob", "hf:acme/tiny", "hashes to git-sha1:"),
        ("copied, not linked", "hf:acme/tiny", "not a link into the cache's blobs/"),
        ("neither", "hf:acme/tiny", "neither a safetensors checkpoint"),
        ("bad name", "hf:acme/../x", "expected hf:ORG/NAME[@REVISION]"),
        ("bad source kind", "s3:acme/tiny", "expected ollama:NAME[:TAG] or hf:ORG/NAME[@REVISION]"),
    ],
)
def test_a_hugging_face_import_that_cannot_be_checked_stores_nothing(
    live_store, tmp_path, capsys, monkeypatch, case, ref, expect
):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = _hf_checkpoint_files(tmp_path)
    if case == "neither":
        files = {"README.md": b"# nothing here\n"}
    snapshot, _ = make_hf_snapshot(cache, "acme/tiny", files)
    if case.startswith("corrupt"):
        blob = (snapshot / ("model.safetensors" if "lfs" in case else "config.json")).resolve()
        blob.write_bytes(blob.read_bytes()[:-1] + b" ")
    if case == "copied, not linked":
        link = snapshot / "tokenizer.json"
        data = link.read_bytes()
        link.unlink()
        link.write_bytes(data)
    code, _, err = strata(capsys, "model", "import", ref, "--url", live_store.url)
    assert code == 1 and expect in err, err
    assert_nothing_stored(live_store.url, *files.values())


def test_a_file_that_changed_after_its_check_is_refused_by_the_store(live_store, tmp_path, gguf_bytes):
    from shared.errors import Invalid

    (tmp_path / "m").mkdir()
    gguf = tmp_path / "m" / "model.gguf"
    gguf.write_bytes(gguf_bytes)
    checked = hashlib.sha256(b"what the file held when it was checked").hexdigest()
    with pytest.raises(Invalid, match=f"not the declared {checked}"):
        StoreClient(live_store.url).push_model(
            gguf.parent, "changed", files=[gguf], known_sha256={"model.gguf": checked}
        )
    assert_nothing_stored(live_store.url, gguf_bytes)
