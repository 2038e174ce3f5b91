"""Where a model version came from when it was not pushed from a checkpoint directory: imported from a
local Ollama or Hugging Face cache, or converted from another version in the store.

Kept in the signed manifest (``ModelManifest.source``) and in ``model.registered`` (so the ledger
indexes it): one definition, imported by shared/catalog.py and shared/events.py (it imports neither).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OLLAMA = "ollama"
HUGGINGFACE = "huggingface"
CONVERSION = "conversion"


class ModelSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ollama", "huggingface", "conversion"]
    name: str = Field(min_length=1, description=(
        "ollama: registry/namespace/name (registry.ollama.ai/library/llama3.2); huggingface: ORG/NAME; "
        "conversion: the source model's name in the store"))
    reference: str = Field(min_length=1, description=(
        "ollama: the tag; huggingface: the revision asked for (main, a tag or a commit); conversion: the source version"))
    resolved: str | None = Field(default=None, description="huggingface: the snapshot's commit the revision named")
    digests: dict[str, str] = Field(default={}, description=(
        "what the source named each imported file by, checked at import: ollama 'manifest' and each layer's "
        "sha256:...; huggingface each path's blob (sha256:... for LFS files, git-sha1:... for others); "
        "conversion: the source's files"))
    derived_from: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$",
                                     description="conversion: the manifest digest of the source version")
    recipe: str | None = Field(default=None, description="conversion: what was done, e.g. 'gguf q4_k_m (llama.cpp quantize)'")
