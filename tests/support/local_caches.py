"""The on-disk layouts of other tools' local caches, built from files a test makes.

Ollama (server/modelpath.go, images.go): ``manifests/<host>/<namespace>/<name>/<tag>`` is an OCI /
Docker distribution v2 manifest whose layers name blobs by digest; each blob is ``blobs/sha256-<hex>``.

The Hugging Face hub cache (huggingface_hub, "Manage huggingface_hub cache-system"):
``models--ORG--NAME/refs/<ref>`` holds a commit hash, ``snapshots/<commit>/<path>`` are relative
symlinks to ``blobs/<etag>``, where the etag of a Git LFS file is its sha256 and that of any other
file its git blob sha1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

OLLAMA_MEDIA = "application/vnd.ollama.image."
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def ollama_blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / digest.replace(":", "-")
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return digest


def make_ollama_model(root: Path, name: str, tag: str, layers: dict[str, bytes], *, namespace: str = "library",
                      host: str = "registry.ollama.ai") -> Path:
    """``layers``: kind (model, template, params, license, system, ...) -> content. Returns the manifest's path."""
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": ollama_blob(root, config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OLLAMA_MEDIA + kind.split("#")[0], "digest": ollama_blob(root, data), "size": len(data)}
            for kind, data in layers.items()
        ],
    }
    path = root / "manifests" / host / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def make_hf_snapshot(
    cache: Path, repo: str, files: dict[str, bytes], *, commit: str | None = None, refs: tuple[str, ...] = ("main",)
) -> tuple[Path, str]:
    """A snapshot of ``repo`` in the hub cache ``cache`` (HF_HOME/hub). Returns (snapshot dir, commit)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files)).encode() + repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for path, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        blob = folder / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot, commit
