"""The provenance exports of a model whose datasets name their source in words, not a URL (#20 item 8:
the built-in model's CycloneDX export failed its own validation), checked with cyclonedx-python-lib's
strict 1.6 validator and the in-toto/SLSA schemas."""

from __future__ import annotations

import pytest

from services.model_store.service_layer.builtin import CORPUS_SOURCE
from services.provenance_ledger.domain import exports
from shared import errors

KJV = CORPUS_SOURCE  # the built-in model's dataset source
MODEL = exports.ModelFacts(
    name="strata-builtin-kjv",
    version=1,
    digest="sha256:" + "ab" * 32,
    leaf_index=3,
    leaf_hash="cd" * 32,
    datasets=[
        exports.DatasetFacts(digest="sha256:" + "01" * 32, name="kjv", source=KJV, license="public-domain"),
        exports.DatasetFacts(digest="sha256:" + "02" * 32, name="web", source="https://example.org/corpus.txt"),
    ],
)


def test_a_dataset_source_in_words_is_kept_as_its_description_and_a_url_as_its_url():
    bom = exports.cyclonedx_ml_bom(MODEL)  # validates (strict 1.6) or raises
    kjv, web = (c["data"][0] for c in bom["components"][1:])
    assert kjv["description"] == f"source: {KJV}" and "contents" not in kjv
    assert web["contents"] == {"url": "https://example.org/corpus.txt"}
    statement = exports.in_toto_statement(MODEL)
    kjv_dep, web_dep = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert kjv_dep["annotations"]["source"] == KJV and "downloadLocation" not in kjv_dep
    assert web_dep["downloadLocation"] == "https://example.org/corpus.txt"


@pytest.mark.parametrize(
    "text, is_url",
    [
        (KJV, False),
        ("https://example.org/x", True),
        ("urn:isbn:0451450523", True),
        ("file:///data/corpus.txt", True),
        ("corpus.txt", False),
        ("http://a b", False),
    ],
)
def test_what_counts_as_a_url(text, is_url):
    assert exports.is_iri(text) is is_url


def test_an_export_that_does_not_validate_is_a_typed_error_that_names_what_failed():
    with pytest.raises(exports.ExportInvalid) as caught:
        exports.validate_cyclonedx(
            {"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{"type": "ai-thing"}]}
        )
    assert isinstance(caught.value, errors.StrataError) and caught.value.code == "export_invalid"
    assert "CycloneDX 1.6" in caught.value.message


def test_a_converted_or_imported_model_names_its_source_in_both_exports():
    from shared.model_source import ModelSource

    parent = "sha256:" + "ef" * 32
    converted = MODEL.model_copy(
        update={
            "source": ModelSource(
                kind="conversion",
                name="llama",
                reference="1",
                derived_from=parent,
                digests={"model.safetensors": "sha256:" + "11" * 32},
                recipe="safetensors -> GGUF F16 -> Q4_K_M",
            )
        }
    )
    imported = MODEL.model_copy(
        update={
            "source": ModelSource(
                kind="huggingface",
                name="acme/llama",
                reference="main",
                resolved="a" * 40,
                digests={"config.json": "git-sha1:" + "b" * 40},
            )
        }
    )
    dep = exports.in_toto_statement(converted)["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    assert (
        dep["digest"] == {"sha256": "ef" * 32}
        and dep["annotations"]["relation"] == "converted-from"
        and dep["name"] == "llama:1"
    )
    dep = exports.in_toto_statement(imported)["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    assert dep["uri"] == "https://huggingface.co/acme/llama/tree/" + "a" * 40 and dep["digest"] == {
        "gitCommit": "a" * 40
    }
    (ancestor,) = exports.cyclonedx_ml_bom(converted)["components"][0]["pedigree"][
        "ancestors"
    ]  # validates (strict 1.6)
    assert ancestor["hashes"] == [{"alg": "SHA-256", "content": "ef" * 32}] and ancestor["version"] == "1"
    (ancestor,) = exports.cyclonedx_ml_bom(imported)["components"][0]["pedigree"]["ancestors"]
    assert ancestor["externalReferences"] == [
        {"type": "distribution", "url": "https://huggingface.co/acme/llama/tree/" + "a" * 40}
    ]
