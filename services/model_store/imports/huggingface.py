"""`hf:ORG/NAME[@REVISION]` from the local Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub,
default ~/.cache/huggingface/hub).

The layout (huggingface_hub's cache, "Manage huggingface_hub cache-system"): ``models--ORG--NAME/``
holds ``refs/<branch or tag>`` (a file with the commit hash), ``snapshots/<commit>/<path>`` (symlinks)
and ``blobs/<etag>``, the content, named by its sha256 for a Git LFS file or by its git blob sha1 for
any other. Every imported file is checked against that name. A safetensors repository (config.json and
*.safetensors, with its tokenizer) is pushed as a checkpoint; a GGUF repository as its one .gguf (or the
one ``--file`` picks when there are several).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.errors import Invalid, NotFound
from shared.model_source import HUGGINGFACE, ModelSource

from services.model_store.client import local_files
from services.model_store.domain.checks import PICKLE_SUFFIXES
from services.model_store.imports import ImportPlan, hash_file_and_sha256, store_name

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def parse_hf_name(ref: str) -> tuple[str, str]:
    """``ORG/NAME[@REVISION]`` (or a legacy ``NAME``) -> (repo id, revision; default main)."""
    repo, _, revision = ref.partition("@")
    revision = revision or "main"
    parts = repo.split("/")
    if (
        not 1 <= len(parts) <= 2
        or not all(_PART.fullmatch(p) for p in parts)
        or not _REVISION.fullmatch(revision)
        or ".." in revision
    ):
        raise Invalid(f"hf:{ref}: expected hf:ORG/NAME[@REVISION], letters, digits, '.', '_', '-'")
    return repo, revision


def read_huggingface(ref: str, gguf_file: str | None = None, cache: Path | None = None) -> ImportPlan:
    repo, revision = parse_hf_name(ref)
    folder = (cache or hub_cache()) / ("models--" + repo.replace("/", "--"))
    if not folder.is_dir():
        raise NotFound(
            f"hf:{repo}: not in the Hugging Face cache ({folder} is missing); download it first "
            f"(huggingface-cli download {repo}), or point HF_HOME at the cache"
        )
    commit = _commit(folder, repo, revision)
    snapshot = folder / "snapshots" / commit
    present = local_files(snapshot)
    files = _select(repo, snapshot, present, gguf_file)
    checked = {f.relative_to(snapshot).as_posix(): _check_blob(repo, folder, f) for f in files}
    digests = {path: digest for path, (digest, _) in checked.items()}
    is_gguf = files[0].suffix == ".gguf"
    notes = (
        []
        if is_gguf
        else [f"left out (pickle): {p.relative_to(snapshot)}" for p in present if p.suffix.lower() in PICKLE_SUFFIXES]
    )
    source = ModelSource(kind=HUGGINGFACE, name=repo, reference=revision, resolved=commit, digests=digests)
    return ImportPlan(
        directory=snapshot,
        files=files,
        name=store_name(repo.split("/")[-1]),
        source=source,
        notes=notes,
        sha256={path: sha for path, (_, sha) in checked.items()},
    )


def _commit(folder: Path, repo: str, revision: str) -> str:
    ref_file = folder / "refs" / revision
    if ref_file.is_file():
        with ref_file.open("rb") as f:  # a commit hash: more is not read, nor echoed in the error below
            commit = f.read(256).decode(errors="replace").strip()
    elif _COMMIT.match(revision):
        commit = revision
    else:
        refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
        raise NotFound(f"hf:{repo}@{revision}: no such revision in the cache (refs here: {', '.join(refs) or 'none'})")
    if not _COMMIT.match(commit) or not (folder / "snapshots" / commit).is_dir():
        raise NotFound(f"hf:{repo}@{revision}: the cache names commit {commit[:64]!r} but has no snapshot of it")
    return commit


def _select(repo: str, snapshot: Path, present: list[Path], gguf_file: str | None) -> list[Path]:
    ggufs = [p for p in present if p.suffix == ".gguf"]
    if gguf_file is not None:
        chosen = [p for p in ggufs if p.relative_to(snapshot).as_posix() == gguf_file]
        if not chosen:
            raise NotFound(
                f"hf:{repo}: --file {gguf_file} is not a .gguf of the snapshot (its GGUFs: "
                f"{', '.join(p.relative_to(snapshot).as_posix() for p in ggufs) or 'none'})"
            )
        return chosen
    names = {p.relative_to(snapshot).as_posix() for p in present}
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return [p for p in present if p.suffix != ".gguf" and p.suffix.lower() not in PICKLE_SUFFIXES]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise Invalid(
            f"hf:{repo}: the snapshot has {len(ggufs)} GGUF files; pick one with --file "
            f"({', '.join(p.relative_to(snapshot).as_posix() for p in ggufs)})"
        )
    raise Invalid(
        f"hf:{repo}: neither a safetensors checkpoint (config.json and *.safetensors) nor a GGUF "
        f"repository (files: {', '.join(sorted(names)) or 'none'})"
    )


def _check_blob(repo: str, folder: Path, file: Path) -> tuple[str, str]:
    """The file's blob, checked against its name: (``sha256:`` for an LFS blob, ``git-sha1:`` for a git blob;
    the content's sha256 as read in that check, which the push declares so a later change is refused)."""
    blob = file.resolve()
    label = f"hf:{repo} {file.name}"
    if blob.parent != (folder / "blobs").resolve():
        raise Invalid(
            f"{label}: not a link into the cache's blobs/ ({blob}), so it cannot be checked against the hub's digest"
        )
    if _SHA256.match(blob.name):
        actual, sha = hash_file_and_sha256(blob)
        kind = "sha256"
    elif _COMMIT.match(blob.name):
        actual, sha = hash_file_and_sha256(blob, "sha1", f"blob {blob.stat().st_size}\0".encode())
        kind = "git-sha1"
    else:
        raise Invalid(f"{label}: blob name {blob.name!r} is neither a sha256 nor a git sha1")
    if actual != blob.name:
        raise Invalid(
            f"{label}: the blob {blob} hashes to {kind}:{actual}, but the cache names it {blob.name} "
            "(corrupt or half-written; download it again)"
        )
    return f"{kind}:{actual}", sha
