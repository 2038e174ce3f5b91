"""A synchronous client of model-store's HTTP API (the CLI's): streamed uploads and downloads,
with a progress callback, and verification of what comes back."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from shared import endpoints, http_tls
from shared.apikeys import local_key
from shared.catalog import (
    NAME_PATTERN,
    AliasResult,
    DatasetList,
    DeleteResult,
    FileEntry,
    ModelList,
    PublicKey,
    PushDatasetRequest,
    PushedDataset,
    PushedModel,
    PushModelRequest,
    ResolvedDataset,
    ResolvedModel,
)
from shared.errors import BlobCorrupt, Invalid, StrataError, Unavailable, from_code
from shared.model_source import ModelSource, claim_problem

from services.model_store.domain.checks import check_files_listing
from shared.model_fetch import VerificationError, verify_manifest

DEFAULT_URL = "http://127.0.0.1:8002"
CHUNK = 1024 * 1024
Progress = Callable[[int], None]  # bytes done since the last call


def default_url() -> str:
    """$STRATA_MODEL_STORE_URL, else where `strata up` serves model-store on this machine, else DEFAULT_URL."""
    return endpoints.url("model-store", "STRATA_MODEL_STORE_URL", DEFAULT_URL)


def api_key_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer`` with ``api_key``, else $STRATA_API_KEY or the data dir's key file
    (shared/apikeys.py local_key); none while there is no key."""
    key = api_key or local_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def local_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory``, hidden ones (.git, .cache) left out."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


class StoreClient:
    def __init__(
        self, url: str | None = None, timeout: float = 60.0, api_key: str | None = None, ca: Path | None = None
    ) -> None:
        """``ca``: the CA an HTTPS model-store's certificate is checked against (default: shared/http_tls.py
        trusted_ca, i.e. $STRATA_HTTP_CA or the data dir's generated one, else the system's roots)."""
        self.url = (url or default_url()).rstrip("/")
        try:
            verify = http_tls.client_verify(ca)
        except http_tls.TlsSetupError as exc:
            raise Invalid(str(exc)) from None
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers=api_key_headers(api_key),
            verify=verify,
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            if reason := http_tls.failure(exc, self.url):
                raise Unavailable(f"model-store at {self.url}: {reason}") from None
            raise Unavailable(f"model-store at {self.url} is not reachable ({exc}); is `strata up` running?") from None
        _raise_for(response)
        return response

    # -- reads --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> ResolvedModel:
        return ResolvedModel.model_validate(self._call("GET", f"/v1/models/{ref}").json())

    def list_models(self, name: str | None = None) -> ModelList:
        return ModelList.model_validate(self._call("GET", "/v1/models", params={"name": name} if name else None).json())

    def public_key(self) -> PublicKey:
        return PublicKey.model_validate(self._call("GET", "/v1/public-key").json())

    def datasets(self) -> DatasetList:
        return DatasetList.model_validate(self._call("GET", "/v1/datasets").json())

    def dataset(self, ref: str) -> ResolvedDataset:
        return ResolvedDataset.model_validate(self._call("GET", f"/v1/datasets/{ref}").json())

    # -- writes -------------------------------------------------------------------------------
    def upload_files(
        self,
        directory: Path,
        files: list[Path],
        progress: Progress | None = None,
        known_sha256: dict[str, str] | None = None,
    ) -> list[FileEntry]:
        """Hash every file, then upload those the store does not hold yet (deduplicated by digest).
        ``known_sha256``: path -> hex digest the caller has just checked (an import): not hashed again;
        model-store hashes what it receives and refuses an upload whose content is not that digest."""
        entries = []
        for file in files:
            path = file.relative_to(directory).as_posix()
            sha = (known_sha256 or {}).get(path) or sha256_file(file)
            entry = FileEntry(path=path, sha256=sha, size=file.stat().st_size)
            entries.append(entry)
            head = self.http.head(f"/v1/blobs/{sha}")
            if head.status_code == 200 and int(head.headers.get("x-blob-size", -1)) == entry.size:
                if progress:
                    progress(entry.size)
                continue
            self._call(
                "PUT",
                f"/v1/blobs/{sha}",
                params={"path": entry.path},
                content=_read_chunks(file, progress),
                headers={"content-length": str(entry.size), "content-type": "application/octet-stream"},
            )
        return entries

    def push_model(
        self,
        directory: Path,
        name: str,
        *,
        datasets: list[str] | None = None,
        license: str | None = None,
        progress: Progress | None = None,
        files: list[Path] | None = None,
        source: ModelSource | None = None,
        known_sha256: dict[str, str] | None = None,
    ) -> PushedModel:
        """``files``: only these files under ``directory`` (an import's selection), else every one;
        ``source``: where an import or a conversion came from (kept in the signed manifest)."""
        if not re.fullmatch(NAME_PATTERN, name):  # before any upload, so a bad name leaves no blobs behind
            raise Invalid(
                f"model name {name!r}: expected letters, digits, '.', '_', '-' (up to 128), "
                "starting with a letter or digit"
            )
        if source is not None and (
            problem := claim_problem(source)
        ):  # what model-store would refuse, refused before any upload
            raise Invalid(f"source: {problem}")
        if directory.is_file():  # one .gguf file: llama.cpp's format holds config, weights and tokenizer
            directory, files = directory.parent, [directory]
        elif files is None:
            files = local_files(directory)
        check_files_listing([f.relative_to(directory).as_posix() for f in files], model=True)
        entries = self.upload_files(directory, files, progress, known_sha256)
        body = PushModelRequest(name=name, files=entries, datasets=datasets or [], license=license, source=source)
        return PushedModel.model_validate(self._call("POST", "/v1/models", json=body.model_dump(mode="json")).json())

    def add_dataset(
        self,
        path: Path,
        name: str,
        *,
        license: str | None = None,
        source: str | None = None,
        description: str | None = None,
        progress: Progress | None = None,
    ) -> PushedDataset:
        directory, files = (path, local_files(path)) if path.is_dir() else (path.parent, [path])
        check_files_listing([f.relative_to(directory).as_posix() for f in files], model=False)
        entries = self.upload_files(directory, files, progress)
        body = PushDatasetRequest(name=name, files=entries, license=license, source=source, description=description)
        return PushedDataset.model_validate(
            self._call("POST", "/v1/datasets", json=body.model_dump(mode="json")).json()
        )

    def set_alias(self, ref: str, alias: str) -> AliasResult:
        return AliasResult.model_validate(self._call("POST", "/v1/aliases", json={"ref": ref, "alias": alias}).json())

    def delete(self, ref: str, all_versions: bool = False) -> DeleteResult:
        return DeleteResult.model_validate(
            self._call("DELETE", f"/v1/models/{ref}", params={"all_versions": all_versions}).json()
        )

    # -- downloads, verified ------------------------------------------------------------------
    def blob_chunks(self, sha256: str) -> Iterator[bytes]:
        received: int | None = None  # None until the answer has begun
        try:
            with self.http.stream("GET", f"/v1/blobs/{sha256}") as response:
                if response.status_code != 200:
                    response.read()
                    _raise_for(response)
                received = 0
                for chunk in response.iter_bytes(CHUNK):
                    received += len(chunk)
                    yield chunk
        except httpx.TransportError as exc:
            if received is not None:
                raise self._broken_off(sha256, received) from None
            reason = http_tls.failure(exc, self.url) or exc
            raise Unavailable(f"model-store at {self.url}: download of sha256:{sha256} failed ({reason})") from None

    def _broken_off(self, sha256: str, received: int) -> StrataError:
        """A download that broke off after its 200: model-store ends it so when it finds the blob corrupt
        on the way, so ask it whether that is why (BlobCorrupt), else the connection failed."""
        try:
            self._call("GET", f"/v1/blobs/{sha256}/check")
        except BlobCorrupt as exc:
            return exc
        except StrataError:
            pass
        return Unavailable(
            f"model-store at {self.url}: the download of sha256:{sha256} broke off after {received} bytes"
        )

    def pull(
        self, ref: str, dest: Path, *, public_key: PublicKey | None = None, progress: Progress | None = None
    ) -> ResolvedModel:
        """Download a model into ``dest``; the signature is checked first, each file's digest as it lands."""
        resolved = self.resolve(ref)
        verify_manifest(resolved, public_key or self.public_key())
        dest.mkdir(parents=True, exist_ok=True)
        for entry in resolved.manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
                if progress:
                    progress(entry.size)
                continue
            partial = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            try:
                with partial.open("wb") as f:
                    for chunk in self.blob_chunks(entry.sha256):
                        digest.update(chunk)
                        f.write(chunk)
                        if progress:
                            progress(len(chunk))
                if digest.hexdigest() != entry.sha256:
                    raise VerificationError(
                        f"{entry.path}: downloaded content hashes to sha256:{digest.hexdigest()}, "
                        f"the signed manifest says sha256:{entry.sha256}"
                    )
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        return resolved

    def verify(
        self, ref: str, *, public_key: PublicKey | None = None, progress: Progress | None = None
    ) -> tuple[ResolvedModel, list[str]]:
        """Check the signature, then stream every blob and hash it. Returns (model, problems)."""
        resolved = self.resolve(ref)
        verify_manifest(resolved, public_key or self.public_key())
        problems = []
        for entry in resolved.manifest.files:
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in self.blob_chunks(entry.sha256):
                    digest.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
            except StrataError as exc:
                problems.append(f"{entry.path}: {exc.message}")
                continue
            if digest.hexdigest() != entry.sha256 or size != entry.size:
                problems.append(
                    f"{entry.path}: stored content hashes to sha256:{digest.hexdigest()} ({size} bytes); "
                    f"the signed manifest says sha256:{entry.sha256} ({entry.size} bytes)"
                )
        return resolved, problems


def _read_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            if progress:
                progress(len(block))
            yield block


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise from_code(error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:300]
    raise from_code("invalid" if response.status_code < 500 else "internal", f"HTTP {response.status_code}: {detail}")
