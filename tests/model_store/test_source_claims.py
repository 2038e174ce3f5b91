"""Adversarial pushes of a ``source``: model-store signs what it accepts, and the ledger indexes it as
lineage, so a claim that does not hold together (a conversion naming no source version, an import that
says it was derived from something, a conversion whose source digests are not its source's files,
text that a terminal would execute, a claim too large for model.registered) is refused before
anything is allocated or published, with a clear error."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("gguf")

from services.model_store.client import StoreClient  # noqa: E402
from shared.errors import Invalid  # noqa: E402
from shared.model_source import ModelSource  # noqa: E402
from tests.support.gguf_model import write_random_gguf  # noqa: E402


def _pushed(live_store, tmp_path):
    client = StoreClient(live_store.url)
    (tmp_path / "g").mkdir()
    gguf = write_random_gguf(tmp_path / "g" / "tiny.F16.gguf", "f16")
    real = client.push_model(gguf, "tiny")
    return client, gguf, real


def test_a_source_claim_that_does_not_hold_together_is_refused(live_store, tmp_path):
    client, gguf, real = _pushed(live_store, tmp_path)
    files = {f.path: "sha256:" + f.sha256 for f in real.manifest.files}
    good = ModelSource(kind="conversion", name="tiny", reference="1", derived_from=real.model.digest, digests=files,
                       recipe="GGUF F16 -> Q8_0")
    cases = {
        "a conversion that names no source version": (
            good.model_copy(update={"derived_from": None}),
            "a conversion must name the version it was made from",
        ),
        "an import that claims to be derived": (
            ModelSource(
                kind="ollama",
                name="registry.ollama.ai/library/tiny",
                reference="latest",
                derived_from=real.model.digest,
            ),
            "only a conversion has derived_from",
        ),
        "an import with a recipe": (
            ModelSource(kind="huggingface", name="acme/tiny", reference="main", recipe="trust me"),
            "only a conversion has",
        ),
        "source digests that are not the source's files": (
            good.model_copy(update={"digests": {"model.gguf": "sha256:" + "1" * 64}}),
            "are not the files of tiny:1",
        ),
        "a terminal escape in the name": (
            ModelSource(kind="huggingface", name="acme/\x1b]8;;http://evil\x07x", reference="main"),
            "is not a Hugging Face repository id",
        ),
        "a terminal escape in the recipe": (
            good.model_copy(update={"recipe": "q4\x1b]8;;http://evil\x07"}),
            "control character",
        ),
        "a digest that is not a digest": (
            ModelSource(kind="huggingface", name="acme/tiny", reference="main", digests={"config.json": "whatever"}),
            "expected sha256:<64 hex> or git-sha1:<40 hex>",
        ),
        "a hub name that is not ORG/NAME": (
            ModelSource(kind="huggingface", name="acme/ti ny", reference="main"),
            "not a Hugging Face repository id",
        ),
        "a hub revision with a path in it": (
            ModelSource(kind="huggingface", name="acme/tiny", reference="../../main"),
            "not a revision",
        ),
        "a resolved commit that is not one": (
            ModelSource(kind="huggingface", name="acme/tiny", reference="main", resolved="HEAD"),
            "not a commit",
        ),
        "an ollama name without its host and namespace": (
            ModelSource(kind="ollama", name="tiny", reference="latest"),
            "not an Ollama HOST/NAMESPACE/NAME",
        ),
        "an ollama tag with a space": (
            ModelSource(kind="ollama", name="registry.ollama.ai/library/tiny", reference="a b"),
            "not an Ollama tag",
        ),
        "a conversion whose version is not a number": (
            good.model_copy(update={"reference": "1@prod"}),
            "not a version number",
        ),
        "a source too large for model.registered": (
            ModelSource(
                kind="huggingface",
                name="acme/tiny",
                reference="main",
                digests={f"shard-{i:06d}-" + "x" * 200: "sha256:" + "2" * 64 for i in range(20_000)},
            ),
            "too large",
        ),
    }
    import httpx

    body = {"name": "tiny", "files": [f.model_dump() for f in real.manifest.files]}
    for case, (source, expect) in cases.items():
        with pytest.raises(Invalid, match=expect):  # the client refuses what it can tell before uploading ...
            client.push_model(gguf, "tiny", source=source)
        r = httpx.post(f"{live_store.url}/v1/models", json={**body, "source": source.model_dump(mode="json")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid", (
            case,
            r.text,
        )  # ... model-store all of it
        assert re.search(expect, r.json()["error"]["message"]), (case, r.text)
        assert [m.model.version for m in client.list_models().models] == [1], case
    converted = client.push_model(gguf, "tiny", source=good)  # what holds together is still accepted
    assert converted.created and converted.manifest.source == good


def test_show_prints_a_source_as_text(live_store, tmp_path, capsys):
    """A license (an Ollama license layer's first line) is the pusher's text: `strata model show` prints
    it as text, not as rich markup (a stray closing tag crashed show for everyone who looked)."""
    from cli.main import main

    client, gguf, _ = _pushed(live_store, tmp_path)
    source = ModelSource(kind="huggingface", name="acme/tiny", reference="main", resolved="a" * 40)
    pushed = client.push_model(gguf, "tiny", source=source, license="[/]AN OLLAMA LICENSE'S FIRST LINE")
    code = main(["model", "show", f"tiny:{pushed.model.version}", "--url", live_store.url])
    out = capsys.readouterr().out
    assert code == 0 and f"source: huggingface acme/tiny main ({'a' * 40})" in out, out
    assert "license: [/]AN OLLAMA LICENSE'S FIRST LINE" in out
    escaped = client.push_model(gguf, "tiny", license="MIT\x1b[2J\x1b]8;;http://evil\x07")  # a license pushed as is
    assert main(["model", "show", f"tiny:{escaped.model.version}", "--url", live_store.url]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "license: MIT\\x1b[2J\\x1b]8;;http://evil\\x07" in out, out


def test_a_push_may_not_add_source_fields_of_its_own(live_store, tmp_path):
    """ModelSource keeps a later version's fields when it reads one; a push adding any is refused."""
    import httpx

    client, gguf, real = _pushed(live_store, tmp_path)
    body = {
        "name": "tiny",
        "files": [f.model_dump() for f in real.manifest.files],
        "source": {"kind": "huggingface", "name": "acme/tiny", "reference": "main", "trusted": True},
    }
    r = httpx.post(f"{live_store.url}/v1/models", json=body)
    assert r.status_code in (400, 422) and "unknown source field(s): trusted" in r.text, r.text
    assert [m.model.version for m in client.list_models().models] == [1]


def test_a_source_the_store_would_refuse_uploads_nothing(live_store, tmp_path):
    """The client checks the claim before any upload (as it does the name): refused, no orphan blobs."""
    import hashlib

    import httpx

    (tmp_path / "g").mkdir()
    gguf = write_random_gguf(tmp_path / "g" / "tiny.F16.gguf", "f16")
    bad = ModelSource(
        kind="huggingface", name="acme/tiny", reference="main", digests={"a\x1b[2J.json": "git-sha1:" + "0" * 40}
    )
    with pytest.raises(Invalid, match="control character"):
        StoreClient(live_store.url).push_model(gguf, "tiny", source=bad)
    assert httpx.head(f"{live_store.url}/v1/blobs/{hashlib.sha256(gguf.read_bytes()).hexdigest()}").status_code == 404
