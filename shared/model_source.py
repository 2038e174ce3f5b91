"""Where a model version came from when it was not pushed from a checkpoint directory: imported from a
local Ollama or Hugging Face cache, or converted from another version in the store.

Kept in the signed manifest (``ModelManifest.source``) and in ``model.registered`` (so the ledger
indexes it): one definition, imported by shared/catalog.py and shared/events.py (it imports neither).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OLLAMA = "ollama"
HUGGINGFACE = "huggingface"
CONVERSION = "conversion"


class ModelSource(BaseModel):
    # extra="allow": a source written by a later version (one more field) still parses and dumps back as it was,
    # so a newer model.registered is logged rather than dead-lettered, and a newer manifest still hashes as signed;
    # a push may not add fields of its own (shared/catalog.py PushModelRequest refuses unknown ones).
    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["ollama", "huggingface", "conversion"]
    name: str = Field(min_length=1, description=(
        "ollama: registry/namespace/name (registry.ollama.ai/library/llama3.2); huggingface: ORG/NAME; "
        "conversion: the source model's name in the store"))
    reference: str = Field(
        min_length=1,
        description=(
            "ollama: the tag; huggingface: the revision asked for (main, a tag or a commit); "
            "conversion: the source version"
        ),
    )
    resolved: str | None = Field(default=None, description="huggingface: the snapshot's commit the revision named")
    digests: dict[str, str] = Field(
        default={},
        description=(
            "what the source named each imported file by, checked at import: ollama 'manifest' and each layer's "
            "sha256:...; huggingface each path's blob (sha256:... for LFS files, git-sha1:... for others); "
            "conversion: the source's files"
        ),
    )
    derived_from: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="conversion: the manifest digest of the source version",
    )
    recipe: str | None = Field(
        default=None, description="conversion: what was done, e.g. 'gguf q4_k_m (llama.cpp quantize)'"
    )


MAX_SOURCE_BYTES = (
    256 * 1024
)  # as JSON: it rides in model.registered, which must stay well under NATS' 1 MB max_payload
_DIGEST_VALUE = re.compile(r"(sha256:[0-9a-f]{64}|git-sha1:[0-9a-f]{40})")
# what the importers accept (services/model_store/imports): the exports turn these into addresses, so they must be names
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_REPO = re.compile(rf"{_PART}(/{_PART})?")
_HF_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_OLLAMA_NAME = re.compile(rf"{_PART}/{_PART}/{_PART}")
_OLLAMA_TAG = re.compile(_PART)


def _control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf") for c in text)


def claim_problem(source: ModelSource) -> str | None:
    """What is wrong with a pushed ``source`` that model-store can tell without its catalog, or None.

    Checked when a version is pushed, not when a stored manifest or a logged event is read (those were
    signed or logged as they are and must still load): a conversion names the version it was made from;
    only a conversion has ``derived_from`` or a ``recipe``, only a Hugging Face import a ``resolved``
    commit; the text is printed by the CLIs, so no control characters; the digests are digests; and the
    whole fits in model.registered."""
    if source.kind == CONVERSION and source.derived_from is None:
        return "a conversion must name the version it was made from (derived_from, its manifest digest)"
    if source.kind != CONVERSION and (source.derived_from is not None or source.recipe is not None):
        return f"only a conversion has derived_from or a recipe, not a {source.kind} import"
    if source.kind != HUGGINGFACE and source.resolved is not None:
        return f"only a huggingface import has a resolved commit, not a {source.kind} source"
    if problem := _shape_problem(source):
        return problem
    texts = [
        ("name", source.name),
        ("reference", source.reference),
        ("resolved", source.resolved or ""),
        ("recipe", source.recipe or ""),
        *(("digests path", path) for path in source.digests),
    ]
    for field, text in texts:
        if _control(text):
            return f"the {field} {text[:80]!r} has a control character"
    for path, digest in source.digests.items():
        if not _DIGEST_VALUE.fullmatch(digest):
            return f"digests[{path[:80]!r}] = {digest[:80]!r}: expected sha256:<64 hex> or git-sha1:<40 hex>"
    size = len(source.model_dump_json())
    if size > MAX_SOURCE_BYTES:
        return f"the source is too large ({size} bytes as JSON, at most {MAX_SOURCE_BYTES})"
    return None


def _shape_problem(source: ModelSource) -> str | None:
    """The name and reference of each kind as its importer (or convert) writes them."""
    from shared.catalog import NAME_PATTERN  # shared/catalog.py imports this module

    name, ref = source.name[:200], source.reference[:200]
    if source.kind == HUGGINGFACE:
        if not _HF_REPO.fullmatch(source.name):
            return f"name {name!r} is not a Hugging Face repository id (ORG/NAME: letters, digits, '.', '_', '-')"
        if not _HF_REVISION.fullmatch(source.reference) or ".." in source.reference:
            return f"reference {ref!r} is not a revision (a branch, a tag or a commit)"
        if source.resolved is not None and not _COMMIT.fullmatch(source.resolved):
            return f"resolved {source.resolved[:200]!r} is not a commit (40 hex digits)"
    elif source.kind == OLLAMA:
        if not _OLLAMA_NAME.fullmatch(source.name):
            return f"name {name!r} is not an Ollama HOST/NAMESPACE/NAME"
        if not _OLLAMA_TAG.fullmatch(source.reference):
            return f"reference {ref!r} is not an Ollama tag"
    else:
        if not re.fullmatch(NAME_PATTERN, source.name):
            return f"name {name!r} is not a model name of this store"
        if not re.fullmatch(r"[1-9][0-9]{0,17}", source.reference):
            return f"reference {ref!r} is not a version number of {name}"
    return None
