"""A manifest signed before ``source`` existed still hashes (and so verifies) byte for byte: these bytes
and this digest were produced by the code of 263fd9f, the commit before #17's import and convert."""

from __future__ import annotations

from shared.catalog import ModelManifest, canonical_json, manifest_digest
from shared.model_source import ModelSource

SIGNED_BEFORE_SOURCE = (
    '{"created":"2026-11-01T12:00:00.123456Z","datasets":["sha256:' + "cd" * 32 + '"],"files":[{"path":"model.gguf",'
    '"sha256":"' + "ab" * 32 + '","size":1234}],"kind":"model","license":"MIT","metadata":{"architecture":"llama",'
    '"context_length":null,"dtype":"F16","format":"gguf","head_dim":null,"hidden_size":null,"intermediate_size":null,'
    '"model_type":null,"num_heads":null,"num_kv_heads":null,"num_layers":null,"parameters":1000,"quantization":"F16",'
    '"runtime":"llama.cpp","tie_word_embeddings":false,"vocab_size":null,"weight_bytes":2000},"name":"tiny",'
    '"training_record":{"epochs":1,"note":"ünïcode"},"version":3}'
).encode()
DIGEST_THEN = "sha256:6c355d6c1184b57acdbfa63a5a06507420754a394d905d711ca526a02428a7c0"


def test_a_manifest_from_before_source_hashes_as_it_was_signed():
    manifest = ModelManifest.model_validate_json(SIGNED_BEFORE_SOURCE)
    assert manifest.source is None
    assert canonical_json(manifest) == SIGNED_BEFORE_SOURCE and manifest_digest(manifest) == DIGEST_THEN
    # and one with a source is a different manifest, whose source is part of what is hashed
    sourced = manifest.model_copy(
        update={"source": ModelSource(kind="ollama", name="registry.ollama.ai/library/tiny", reference="latest")}
    )
    again = ModelManifest.model_validate_json(canonical_json(sourced))
    assert again.source == sourced.source and manifest_digest(again) == manifest_digest(sourced) != DIGEST_THEN


def test_a_manifest_whose_source_has_a_later_field_still_hashes_as_signed():
    """A newer model-store's source with one more field: read and dumped back unchanged, so its digest holds."""
    import json

    source = {
        "derived_from": None,
        "digests": {},
        "kind": "ollama",
        "license_url": "https://example.org/L",
        "name": "registry.ollama.ai/library/tiny",
        "recipe": None,
        "reference": "latest",
        "resolved": None,
    }
    later = json.dumps(
        {**json.loads(SIGNED_BEFORE_SOURCE), "source": source},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    manifest = ModelManifest.model_validate_json(later)
    assert canonical_json(manifest) == later and manifest.source.model_extra == {"license_url": "https://example.org/L"}
