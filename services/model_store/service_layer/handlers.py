"""model-store's use cases: register, resolve, list, alias, delete (+ garbage collection).

The KV bucket is the truth; the SQLite index answers reads and falls back to KV for a version or
alias it has not seen yet (another replica may have written it a moment ago).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable

from shared.catalog import (
    AliasResult, DatasetList, DatasetManifest, DeleteResult, FileEntry, ModelList, ModelManifest, ModelSummary,
    PushDatasetRequest, PushedDataset, PushedModel, PushModelRequest, ResolvedDataset, ResolvedModel, canonical_json,
    manifest_digest, parse_ref,
)
from shared.errors import Invalid, NotFound
from shared.model_source import CONVERSION, ModelSource, claim_problem
from shared.events import (
    DatasetRegistered, EventData, ModelAliased, ModelDeleted, ModelId, ModelRegistered, ModelSigned,
)

from shared.blob_store import BlobStore
from services.model_store.adapters.catalog_kv import CatalogKV, StoredModel, dec, enc
from services.model_store.adapters.index import CatalogIndex
from services.model_store.domain.checks import check_files_listing
from services.model_store.domain.gguf import is_gguf
from services.model_store.domain.metadata import MAX_CONFIG_BYTES, gguf_metadata, model_metadata, parse_config, warnings
from services.model_store.domain.signing import Signer
from services.model_store.service_layer.ingest import Ingest, is_safetensors

log = logging.getLogger("model-store")
Publish = Callable[..., Awaitable[object]]
TRAINING_RECORD = "training_record.json"


class ModelStore:
    def __init__(
        self, kv: CatalogKV, blobs: BlobStore, index: CatalogIndex, signer: Signer, ingest: Ingest, publish: Publish
    ) -> None:
        self.kv, self.blobs, self.index, self.signer, self.ingest = kv, blobs, index, signer, ingest
        self._publish = publish

    async def publish(self, data: EventData, event_id: str) -> None:
        try:
            await self._publish(data, event_id=event_id)
        except Exception:  # the catalog write stands; the id makes a later re-publish a duplicate
            log.exception("could not publish %s", data.TYPE)

    # -- models -------------------------------------------------------------------------------
    async def register_model(self, request: PushModelRequest) -> PushedModel:
        check_files_listing([f.path for f in request.files], model=True)
        summaries, ggufs = [], {}
        for entry in request.files:
            info = await self.ingest.info_for(entry.sha256, entry.path, entry.size)
            if is_safetensors(entry.path):
                assert info.safetensors is not None
                summaries.append(info.safetensors)
            elif is_gguf(entry.path):
                assert info.gguf is not None
                ggufs[entry.path] = info.gguf
        by_path = {f.path: f for f in request.files}
        if ggufs:  # llama.cpp's format: the header is the config (a config.json beside it is kept as data)
            metadata = gguf_metadata(ggufs)
        else:
            metadata = model_metadata(parse_config(await self._read(by_path["config.json"])), summaries)
        for digest in request.datasets:
            if not digest.startswith("sha256:") or await self._dataset(digest) is None:
                raise Invalid(f"dataset {digest!r} is not registered (strata dataset add PATH first)")
        if request.source is not None:
            await self._check_source(request.source)
        record = request.training_record
        if record is None and TRAINING_RECORD in by_path:
            try:
                record = json.loads(await self._read(by_path[TRAINING_RECORD]))
            except ValueError as exc:
                raise Invalid(f"{TRAINING_RECORD}: not valid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise Invalid(f"{TRAINING_RECORD}: must be a JSON object")
        files = sorted(request.files, key=lambda f: f.path)
        content = dict(
            files=files,
            metadata=metadata,
            license=request.license,
            datasets=request.datasets,
            training_record=record,
            source=request.source,
        )
        said = warnings(metadata)
        for existing in await self._versions(request.name):
            m = existing.manifest
            # runtime is what push decides, not content: a manifest from before the field is the same version
            same_meta = m.metadata.model_copy(update={"runtime": metadata.runtime})
            if canonical_json(
                _dump(
                    dict(
                        files=m.files,
                        metadata=same_meta,
                        license=m.license,
                        datasets=m.datasets,
                        training_record=m.training_record,
                        source=m.source,
                    )
                )
            ) == canonical_json(_dump(content)):
                return PushedModel(**existing.model_dump(), created=False, warnings=said)
        version = await self.kv.allocate_version(request.name)
        manifest = ModelManifest(name=request.name, version=version, **content)
        model = ModelId(name=request.name, version=version, digest=manifest_digest(manifest))
        stored = StoredModel(model=model, manifest=manifest, signature=self.signer.sign(manifest))
        await self.kv.create_model(stored)
        self.index.put_model(stored)
        record_digest = "sha256:" + hashlib.sha256(canonical_json(record)).hexdigest() if record else None
        await self.publish(
            ModelRegistered(
                model=model,
                architecture=metadata.architecture,
                parameters=metadata.parameters,
                datasets=request.datasets,
                training_record=record_digest,
                license=request.license,
                source=request.source,
            ),
            event_id=f"model.registered.{model.digest}",
        )
        await self.publish(ModelSigned(model=model, key_id=self.signer.key_id), event_id=f"model.signed.{model.digest}")
        if said:
            log.warning("%s:%d stored, but %s", model.name, model.version, "; ".join(said))
        return PushedModel(**stored.model_dump(), created=True, warnings=said)

    async def resolve(self, ref: str) -> ResolvedModel:
        parsed = parse_ref(ref)
        version = parsed.version
        if parsed.alias is not None:
            version = self.index.alias(parsed.name, parsed.alias) or await self.kv.get_alias(parsed.name, parsed.alias)
            if version is None:
                raise NotFound(f"{parsed.name} has no alias {parsed.alias!r}")
        elif version is None:
            version = self.index.latest_version(parsed.name)
            if version is None:
                versions = await self._versions(parsed.name)
                version = versions[-1].model.version if versions else None
            if version is None:
                raise NotFound(f"no model named {parsed.name!r}")
        stored = self.index.model(parsed.name, version) or await self.kv.get_model(parsed.name, version)
        if stored is None:
            raise NotFound(
                f"{parsed.name}:{version} does not exist" + (f" ({ref} points at it)" if parsed.alias else "")
            )
        return ResolvedModel(
            **stored.model_dump(exclude={"aliases"}), aliases=self.index.aliases_of(parsed.name, version)
        )

    async def list_models(self, name: str | None = None) -> ModelList:
        summaries = []
        for stored in self.index.models(name):
            m = stored.manifest
            summaries.append(
                ModelSummary(
                    model=stored.model,
                    architecture=m.metadata.architecture,
                    parameters=m.metadata.parameters,
                    dtype=m.metadata.dtype,
                    weight_bytes=m.metadata.weight_bytes,
                    size=sum(f.size for f in m.files),
                    license=m.license,
                    datasets=m.datasets,
                    created=m.created,
                    aliases=self.index.aliases_of(stored.model.name, stored.model.version),
                )
            )
        return ModelList(models=summaries)

    async def set_alias(self, ref: str, alias: str) -> AliasResult:
        target = await self.resolve(ref)
        name = target.model.name
        previous = await self.kv.set_alias(name, alias, target.model.version)
        self.index.set_alias(name, alias, target.model.version)
        if previous != target.model.version:
            await self.publish(
                ModelAliased(model=target.model, alias=alias, previous_version=previous),
                event_id=f"model.aliased.{name}.{alias}.{target.model.version}.{previous}",
            )
        return AliasResult(model=target.model, alias=alias, previous_version=previous)

    async def remove_alias(self, name: str, alias: str) -> None:
        parse_ref(f"{name}@{alias}")  # a malformed name or alias is Invalid (400), never a bad KV key
        if await self.kv.get_alias(name, alias) is None:
            raise NotFound(f"{name} has no alias {alias!r}")
        await self.kv.delete_alias(name, alias)
        self.index.delete_alias(name, alias)

    async def delete(self, ref: str, *, all_versions: bool = False) -> DeleteResult:
        parsed = parse_ref(ref)
        if parsed.version is None and parsed.alias is None:
            if not all_versions:
                raise Invalid(
                    f"{ref!r} names no version: delete NAME:VERSION or NAME@ALIAS, or every version with all_versions"
                )
            targets = await self._versions(parsed.name)
            if not targets:
                raise NotFound(f"no model named {parsed.name!r}")
        else:
            targets = [StoredModel(**(await self.resolve(ref)).model_dump(exclude={"aliases"}))]
        candidates: set[str] = set()
        for stored in targets:
            name, version = stored.model.name, stored.model.version
            for alias, points_at in self.index.aliases(name).items():
                if points_at == version:
                    await self.kv.delete_alias(name, alias)
            await self.kv.delete_model(name, version)
            self.index.delete_model(name, version)
            candidates.update(f.sha256 for f in stored.manifest.files)
            await self.publish(
                ModelDeleted(model=stored.model), event_id=f"model.deleted.{stored.model.digest}.{version}"
            )
        removed = await self.collect_garbage(candidates)
        return DeleteResult(deleted=[t.model for t in targets], blobs_removed=sorted(removed))

    async def collect_garbage(self, candidates: set[str]) -> set[str]:
        """Delete those candidate blobs that no manifest in KV (the truth, every replica's) uses."""
        referenced = await self.referenced_blobs()
        removed = set()
        for sha256 in candidates - referenced:
            if await self.blobs.delete(sha256):
                removed.add(sha256)
            await self.kv.delete_blob_info(sha256)
        return removed

    async def referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for key in await self.kv.keys():
            kind, _, rest = key.partition(".")
            if kind == "model":
                name, _, version = rest.rpartition(".")
                stored = await self.kv.get_model(dec(name), int(version))
                if stored is not None:
                    refs.update(f.sha256 for f in stored.manifest.files)
            elif kind == "dataset":
                dataset = await self.kv.get_dataset(rest)
                if dataset is not None:
                    refs.update(f.sha256 for f in dataset.manifest.files)
        return refs

    # -- datasets -----------------------------------------------------------------------------
    async def register_dataset(self, request: PushDatasetRequest) -> PushedDataset:
        check_files_listing([f.path for f in request.files], model=False)
        for entry in request.files:
            await self.ingest.info_for(entry.sha256, entry.path, entry.size)
        files = sorted(request.files, key=lambda f: f.path)
        fields = dict(
            name=request.name,
            files=files,
            source=request.source,
            license=request.license,
            description=request.description,
        )
        for existing in self.index.datasets():
            m = existing.manifest
            if canonical_json(
                _dump(dict(name=m.name, files=m.files, source=m.source, license=m.license, description=m.description))
            ) == canonical_json(_dump(fields)):
                return PushedDataset(**existing.model_dump(), created=False)
        manifest = DatasetManifest(**fields)
        stored = ResolvedDataset(
            digest=manifest_digest(manifest), manifest=manifest, signature=self.signer.sign(manifest)
        )
        await self.kv.put_dataset(stored)
        self.index.put_dataset(stored)
        await self.publish(
            DatasetRegistered(
                name=manifest.name,
                digest=stored.digest,
                files={f.path: f.sha256 for f in files},
                source=manifest.source,
                license=manifest.license,
            ),
            event_id=f"dataset.registered.{stored.digest}",
        )
        return PushedDataset(**stored.model_dump(), created=True)

    async def dataset(self, ref: str) -> ResolvedDataset:
        found = await self._dataset(ref) if ref.startswith("sha256:") else self.index.dataset_by_name(ref)
        if found is None:
            raise NotFound(f"no dataset {ref!r}")
        return found

    async def list_datasets(self) -> DatasetList:
        return DatasetList(datasets=self.index.datasets())

    # -- helpers ------------------------------------------------------------------------------
    async def _check_source(self, source: ModelSource) -> None:
        """A pushed source is signed into the manifest and indexed by the ledger as lineage: refuse a claim
        that does not hold together (shared/model_source.py claim_problem), and a conversion's that names
        no version here by name, version and manifest digest, or whose source digests are not its files."""
        if problem := claim_problem(source):
            raise Invalid(f"source: {problem}")
        if source.kind != CONVERSION:
            return
        try:
            found = await self.resolve(f"{source.name}:{source.reference}")
        except (NotFound, Invalid):
            found = None
        if found is None or found.model.digest != source.derived_from:
            raise Invalid(
                f"source {source.name}:{source.reference} ({source.derived_from}) is not a version in this store: "
                "a conversion's derived_from must name the version it was made from"
            )
        files = {f.path: "sha256:" + f.sha256 for f in found.manifest.files}
        if source.digests != files:
            raise Invalid(
                f"source {source.name}:{source.reference}: its digests are not the files of "
                f"{found.model.name}:{found.model.version} (a conversion lists the files it was made from)"
            )

    async def _dataset(self, digest: str) -> ResolvedDataset | None:
        return self.index.dataset(digest) or await self.kv.get_dataset(digest)

    async def _versions(self, name: str) -> list[StoredModel]:
        """Every version of ``name``, from the index, or from KV when the index has none yet."""
        found = self.index.models(name)
        if found:
            return found
        prefix = f"model.{enc(name)}."
        versions = sorted(
            int(k[len(prefix) :]) for k in await self.kv.keys() if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )
        return [m for v in versions if (m := await self.kv.get_model(name, v)) is not None]

    async def _read(self, entry: FileEntry) -> bytes:
        return await self.ingest.read_small(entry.sha256, entry.path, MAX_CONFIG_BYTES)


def _dump(value: dict) -> dict:
    return {
        k: (
            [x.model_dump(mode="json") for x in v]
            if isinstance(v, list) and v and hasattr(v[0], "model_dump")
            else v.model_dump(mode="json")
            if hasattr(v, "model_dump")
            else v
        )
        for k, v in value.items()
    }
