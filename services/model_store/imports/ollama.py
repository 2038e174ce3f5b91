"""`ollama:NAME[:TAG]` from a local Ollama models directory ($OLLAMA_MODELS, default ~/.ollama/models).

The layout (Ollama's server/modelpath.go and images.go): a manifest per tag at
``manifests/<host>/<namespace>/<name>/<tag>`` (host registry.ollama.ai, namespace library, tag latest
by default), in the OCI / Docker distribution v2 shape, whose layers name blobs by digest; each blob
is the file ``blobs/sha256-<hex>``. The layers of a model: ``application/vnd.ollama.image.model``
(the GGUF), ``.template`` (a Go template), ``.params`` (JSON), ``.license``, ``.system`` and
``.messages``. The GGUF is pushed as model.gguf, the others beside it under ollama/ (LICENSE at the
top), so all of them are content-addressed and listed in the signed manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import Invalid, NotFound
from shared.model_source import OLLAMA, ModelSource

from services.model_store.domain.checks import json_object
from services.model_store.imports import ImportPlan, check_sha256, store_name

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MEDIA_PREFIX = "application/vnd.ollama.image."
GGUF_LAYER = MEDIA_PREFIX + "model"
# layer kind -> file name in the pushed model (the kinds that may occur more than once get a number)
FILE_FOR = {"template": "ollama/template", "params": "ollama/params.json", "system": "ollama/system",
            "messages": "ollama/messages.json", "license": "LICENSE"}
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest lists a handful of layers in a few hundred bytes
MAX_PARAMS_BYTES = 1024 * 1024  # Ollama's params are a few options; more is not read into memory
LICENSE_TITLE_BYTES = 64 * 1024  # the license's first line is looked for in this much of it
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIGEST = r"^sha256:[0-9a-f]{64}$"


class OllamaLayer(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    media_type: str = Field(alias="mediaType")
    digest: str = Field(pattern=_DIGEST)
    size: int = Field(ge=0)


class OllamaManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schemaVersion: int
    layers: list[OllamaLayer]


def models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def parse_ollama_name(ref: str) -> tuple[str, str, str, str]:
    """``NAME``, ``NAME:TAG``, ``NAMESPACE/NAME[:TAG]`` or ``HOST/NAMESPACE/NAME[:TAG]``
    -> (host, namespace, name, tag)."""
    path, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", DEFAULT_TAG)
    parts = path.split("/")
    if (
        len(parts) > 3 or not all(_PART.fullmatch(p) for p in parts) or not _PART.fullmatch(tag)
    ):  # fullmatch: `$` admits a trailing newline
        raise Invalid(
            f"ollama:{ref}: expected ollama:NAME[:TAG] (NAME may be NAMESPACE/NAME), letters, digits, '.', '_', '-'"
        )
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, name = parts
    elif len(parts) == 2:
        namespace, name = parts
    else:
        (name,) = parts
    return host, namespace, name, tag


def read_ollama(ref: str, staging: Path, root: Path | None = None) -> ImportPlan:
    """Check the manifest and every layer's blob of ``ref``; link them into ``staging`` as the files to push."""
    root = root or models_dir()
    host, namespace, name, tag = parse_ollama_name(ref)
    manifest_path = root / "manifests" / host / namespace / name / tag
    if not manifest_path.is_file():
        tags = sorted(p.name for p in manifest_path.parent.glob("*")) if manifest_path.parent.is_dir() else []
        known = f" (its tags here: {', '.join(tags)})" if tags else ""
        raise NotFound(
            f"ollama:{ref}: no manifest {manifest_path}{known}; `ollama pull {name}:{tag}` first, "
            "or point OLLAMA_MODELS at the models directory"
        )
    size = manifest_path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise Invalid(
            f"ollama:{ref}: {manifest_path} is too large for an Ollama manifest ({size} bytes, at most "
            f"{MAX_MANIFEST_BYTES}); nothing was imported"
        )
    raw = manifest_path.read_bytes()
    try:
        manifest = OllamaManifest.model_validate_json(raw)
    except ValidationError as exc:
        raise Invalid(
            f"ollama:{ref}: {manifest_path} is not an Ollama manifest: {exc.errors()[0]['msg']} "
            f"at {'.'.join(map(str, exc.errors()[0]['loc']))}"
        ) from None
    models = [layer for layer in manifest.layers if layer.media_type == GGUF_LAYER]
    if len(models) != 1:
        raise Invalid(
            f"ollama:{ref}: the manifest has {len(models)} layers of type {GGUF_LAYER}; "
            "an importable model has one GGUF"
        )
    staging.mkdir(parents=True, exist_ok=True)
    digests = {"manifest": "sha256:" + hashlib.sha256(raw).hexdigest()}
    files, license_text, counts = [], None, {}
    for layer in manifest.layers:
        kind = layer.media_type.removeprefix(MEDIA_PREFIX)
        if layer.media_type == GGUF_LAYER:
            target = "model.gguf"
        elif layer.media_type.startswith(MEDIA_PREFIX) and kind in FILE_FOR:
            counts[kind] = counts.get(kind, 0) + 1
            target = FILE_FOR[kind] + (f".{counts[kind]}" if counts[kind] > 1 else "")
        else:
            raise Invalid(
                f"ollama:{ref}: layer {layer.digest} is of type {layer.media_type}, which Strata cannot serve "
                "(a projector or an adapter needs its runtime support); nothing was imported"
            )
        blob = root / "blobs" / layer.digest.replace(":", "-")
        if not blob.is_file():
            raise NotFound(
                f"ollama:{ref}: the blob of layer {kind} ({blob}) is missing; `ollama pull {name}:{tag}` again"
            )
        if blob.stat().st_size != layer.size:
            raise Invalid(f"ollama:{ref}: {blob} has {blob.stat().st_size} bytes, the manifest says {layer.size}")
        check_sha256(blob, layer.digest.removeprefix("sha256:"), f"ollama:{ref} layer {kind}")
        if kind == "params":
            _check_params(ref, blob)
        if kind == "license" and license_text is None:
            with blob.open("rb") as f:  # only the title is read here: the whole text is pushed as LICENSE
                license_text = f.read(LICENSE_TITLE_BYTES).decode(errors="replace")
        digests[target] = layer.digest
        link = staging / target
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob.resolve())
        files.append(link)
    source = ModelSource(kind=OLLAMA, name=f"{host}/{namespace}/{name}", reference=tag, digests=digests)
    return ImportPlan(
        directory=staging,
        files=sorted(files),
        name=store_name(name if tag == DEFAULT_TAG else f"{name}-{tag}"),
        source=source,
        license=_license_title(license_text),
    )


def _check_params(ref: str, blob: Path) -> None:
    size = blob.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise Invalid(
            f"ollama:{ref}: the params layer {blob} is too large ({size} bytes, at most {MAX_PARAMS_BYTES}); "
            "nothing was imported"
        )
    try:
        json_object(blob.read_bytes())
    except ValueError as exc:
        raise Invalid(f"ollama:{ref}: the params layer {blob} is {exc}") from None


def _license_title(text: str | None) -> str | None:
    """The manifest's short license field: the license text's first line (the whole text is the LICENSE file)."""
    if not text:
        return None
    # the model author's text, printed by `strata model show`: no control characters (terminal escapes)
    printable = [
        "".join(c for c in line if unicodedata.category(c) not in ("Cc", "Cf")).strip() for line in text.splitlines()
    ]
    first = next((line for line in printable if line), "")
    return first[:200] or None
