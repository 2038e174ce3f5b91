"""Standard exports of a model's provenance, built from the ledger's records and checked against
their schemas before they leave: an in-toto Statement v1 with a SLSA Provenance v1 predicate
(materials = the datasets, builder = the training record), and a CycloneDX 1.6 ML-BOM (a
``machine-learning-model`` component with a model card, its datasets as ``data`` components).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from shared.errors import StrataError
from shared.model_source import CONVERSION, HUGGINGFACE, OLLAMA, ModelSource

IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://strata.dev/provenance/training/v1"
LEDGER_URN = "urn:strata:provenance-ledger"


class ExportInvalid(StrataError):
    """An export did not validate against its schema: a bug, never handed out (HTTP 500, code export_invalid)."""

    code = "export_invalid"


_IRI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")


def is_iri(text: str) -> bool:
    """Whether a dataset's ``source`` is an address (``https://...``, ``urn:...``), which the schemas
    take as a URL; anything else (a book and an edition, say) is kept as words."""
    return bool(_IRI.match(text))


class DatasetFacts(BaseModel):
    digest: str
    name: str | None = None
    source: str | None = None
    license: str | None = None
    leaf_index: int | None = None


class ModelFacts(BaseModel):
    name: str
    version: int
    digest: str
    architecture: str | None = None
    parameters: int | None = None
    training_record: str | None = None
    license: str | None = None
    registered_at: str | None = None
    leaf_index: int
    leaf_hash: str
    datasets: list[DatasetFacts] = []
    tree_head: dict[str, Any] | None = None
    source: ModelSource | None = None


def source_location(source: ModelSource) -> str | None:
    """Where an import came from, as the address its tool fetched it from (a conversion's is the ledger's)."""
    # percent-encoded: model-store checks the names it accepts, but the log holds whatever was published
    if source.kind == HUGGINGFACE:
        return f"https://huggingface.co/{quote(source.name)}/tree/{quote(source.resolved or source.reference, safe='')}"
    if source.kind == OLLAMA:
        host, _, path = source.name.partition("/")
        return f"https://{quote(host, safe='')}/v2/{quote(path)}/manifests/{quote(source.reference, safe='')}"
    return f"{LEDGER_URN}:model:{source.derived_from}" if source.derived_from else None


def source_digest(source: ModelSource) -> dict[str, str]:
    """The one digest that names the whole source: the version converted from, the Ollama manifest, the hub commit."""
    if source.kind == CONVERSION and source.derived_from:
        return digest_set(source.derived_from)
    if source.kind == OLLAMA and "manifest" in source.digests:
        return digest_set(source.digests["manifest"])
    if source.kind == HUGGINGFACE and source.resolved:
        return {"gitCommit": source.resolved}
    return {}


def _source_dependency(source: ModelSource) -> dict[str, Any]:
    """The source as an in-toto ResourceDescriptor: a converted-from model or an imported-from repository."""
    relation = "converted-from" if source.kind == CONVERSION else f"imported-from-{source.kind}"
    annotations = {"relation": relation, "reference": source.reference, "files": source.digests,
                   **({"recipe": source.recipe} if source.recipe else {})}
    return {
        "uri": source_location(source) or f"{LEDGER_URN}:source:{source.kind}:{source.name}",
        "name": f"{source.name}:{source.reference}",
        **({"digest": source_digest(source)} if source_digest(source) else {}),
        "annotations": annotations,
    }


def digest_set(digest: str) -> dict[str, str]:
    """``sha256:ab..`` or a bare 64-hex digest -> ``{"sha256": "ab.."}`` (in-toto DigestSet)."""
    algo, sep, value = digest.partition(":")
    if not sep:
        algo, value = ("sha256", digest) if len(digest) == 64 else ("strata", digest)
    return {algo.lower(): value.lower()}


# The normative fields of in-toto Statement v1 and SLSA Provenance v1 as JSON Schema
# (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md, https://slsa.dev/spec/v1.0/provenance).
_DIGEST_SET = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": {"type": "string", "pattern": "^[0-9a-fA-F]+$|^[^:]+$"},
}
_RESOURCE = {
    "type": "object",
    "properties": {
        "uri": {"type": "string"},
        "digest": _DIGEST_SET,
        "name": {"type": "string"},
        "downloadLocation": {"type": "string"},
        "mediaType": {"type": "string"},
        "annotations": {"type": "object"},
    },
    "anyOf": [{"required": ["uri"]}, {"required": ["digest"]}, {"required": ["content"]}],
}
STATEMENT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["_type", "subject", "predicateType", "predicate"],
    "additionalProperties": False,
    "properties": {
        "_type": {"const": IN_TOTO_STATEMENT},
        "subject": {"type": "array", "minItems": 1, "items": {**_RESOURCE, "required": ["digest"]}},
        "predicateType": {"type": "string", "format": "uri", "minLength": 1},
        "predicate": {"type": "object"},
    },
}
SLSA_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["buildDefinition", "runDetails"],
    "additionalProperties": False,
    "properties": {
        "buildDefinition": {
            "type": "object",
            "required": ["buildType", "externalParameters"],
            "additionalProperties": False,
            "properties": {
                "buildType": {"type": "string", "minLength": 1},
                "externalParameters": {"type": "object"},
                "internalParameters": {"type": "object"},
                "resolvedDependencies": {"type": "array", "items": _RESOURCE},
            },
        },
        "runDetails": {
            "type": "object",
            "required": ["builder"],
            "additionalProperties": False,
            "properties": {
                "builder": {
                    "type": "object",
                    "required": ["id"],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string", "minLength": 1},
                        "version": {"type": "object"},
                        "builderDependencies": {"type": "array", "items": _RESOURCE},
                    },
                },
                "metadata": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "invocationId": {"type": "string"},
                        "startedOn": {"type": "string", "format": "date-time"},
                        "finishedOn": {"type": "string", "format": "date-time"},
                    },
                },
                "byproducts": {"type": "array", "items": _RESOURCE},
            },
        },
    },
}


def validate_in_toto(statement: dict[str, Any]) -> None:
    # here, not at the top: importing it takes ~1 s (rfc3987_syntax builds its grammars), every ledger start
    import jsonschema

    try:
        jsonschema.validate(statement, STATEMENT_SCHEMA)
        if statement["predicateType"] == SLSA_PROVENANCE:
            jsonschema.validate(statement["predicate"], SLSA_SCHEMA)
    except jsonschema.ValidationError as exc:
        raise ExportInvalid(f"in-toto statement: {exc.message} at {'/'.join(map(str, exc.absolute_path))}") from None


def in_toto_statement(model: ModelFacts) -> dict[str, Any]:
    builder_id = (
        f"{LEDGER_URN}:training-record:{model.training_record}"
        if model.training_record
        else f"{LEDGER_URN}:builder:unknown"
    )
    dependencies = [
        {
            "uri": f"{LEDGER_URN}:dataset:{ds.digest}",
            "digest": digest_set(ds.digest),
            **({"name": ds.name} if ds.name else {}),
            **({"downloadLocation": ds.source} if ds.source and is_iri(ds.source) else {}),
            "annotations": {
                k: v
                for k, v in {
                    "license": ds.license,
                    "ledger_leaf_index": ds.leaf_index,
                    "source": None if ds.source is None or is_iri(ds.source) else ds.source,
                }.items()
                if v is not None
            },
        }
        for ds in model.datasets
    ]
    if model.source is not None:
        dependencies.insert(0, _source_dependency(model.source))
    byproducts = [
        {
            "name": "ledger-leaf",
            "uri": f"{LEDGER_URN}:leaf:{model.leaf_index}",
            "digest": {"sha256": model.leaf_hash},
            "annotations": {
                "leaf_index": model.leaf_index,
                **({"tree_head": model.tree_head} if model.tree_head else {}),
            },
        }
    ]
    if model.training_record:
        byproducts.append({"name": "training-record", "digest": digest_set(model.training_record)})
    statement = {
        "_type": IN_TOTO_STATEMENT,
        "subject": [{"name": f"{model.name}:{model.version}", "digest": digest_set(model.digest)}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    k: v
                    for k, v in {
                        "model": model.name,
                        "version": model.version,
                        "architecture": model.architecture,
                        "parameters": model.parameters,
                        "license": model.license,
                    }.items()
                    if v is not None
                },
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": builder_id},
                "metadata": {
                    k: v
                    for k, v in {"invocationId": model.training_record, "finishedOn": model.registered_at}.items()
                    if v
                },
                "byproducts": byproducts,
            },
        },
    }
    validate_in_toto(statement)
    return statement


def validate_cyclonedx(bom: dict[str, Any]) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    if error is not None:
        raise ExportInvalid(f"CycloneDX 1.6: {error}")


def _source(source: str | None) -> dict[str, Any]:
    """A CycloneDX componentData's source: its URL where it is one, else in its description."""
    if source is None:
        return {}
    return {"contents": {"url": source}} if is_iri(source) else {"description": f"source: {source}"}


def cyclonedx_ml_bom(model: ModelFacts) -> dict[str, Any]:
    def hashes(digest: str) -> list[dict[str, str]]:
        algo, value = next(iter(digest_set(digest).items()))
        return [{"alg": "SHA-256", "content": value}] if algo == "sha256" and len(value) == 64 else []

    def licenses(name: str | None) -> dict[str, Any]:
        return {"licenses": [{"license": {"name": name}}]} if name else {}

    model_ref = f"model:{model.name}:{model.version}"
    data_components = [
        {
            "type": "data",
            "bom-ref": f"dataset:{ds.digest}",
            "name": ds.name or ds.digest,
            **licenses(ds.license),
            **({"hashes": hashes(ds.digest)} if hashes(ds.digest) else {}),
            "data": [{"type": "dataset", "name": ds.name or ds.digest, **_source(ds.source)}],
            "properties": [{"name": "strata:digest", "value": ds.digest}],
        }
        for ds in model.datasets
    ]
    properties = [
        {"name": "strata:manifest_digest", "value": model.digest},
        {"name": "strata:ledger_leaf_index", "value": str(model.leaf_index)},
        {"name": "strata:ledger_leaf_hash", "value": model.leaf_hash},
    ]
    if model.training_record:
        properties.append({"name": "strata:training_record", "value": model.training_record})
    if model.parameters is not None:
        properties.append({"name": "strata:parameters", "value": str(model.parameters)})
    component = {
        "type": "machine-learning-model",
        "bom-ref": model_ref,
        "name": model.name,
        "version": str(model.version),
        **({"hashes": hashes(model.digest)} if hashes(model.digest) else {}),
        **licenses(model.license),
        "modelCard": {
            "modelParameters": {
                "task": "text-generation",
                **({"architectureFamily": model.architecture} if model.architecture else {}),
                "datasets": [{"ref": d["bom-ref"]} for d in data_components],
            },
            "considerations": {"useCases": ["served by Strata; every inference is recorded in the provenance ledger"]},
        },
        "properties": properties,
        **({"pedigree": {"ancestors": [_ancestor(model.source)]}} if model.source else {}),
    }
    bom = {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{LEDGER_URN}:{model.digest}:{model.leaf_index}')}",
        "version": 1,
        "metadata": {
            "component": {
                "type": "machine-learning-model",
                "bom-ref": f"{model_ref}:meta",
                "name": model.name,
                "version": str(model.version),
            },
            **({"timestamp": model.registered_at} if model.registered_at else {}),
        },
        "components": [component, *data_components],
        "dependencies": [
            {"ref": model_ref, "dependsOn": [d["bom-ref"] for d in data_components]},
            *({"ref": d["bom-ref"]} for d in data_components),
        ],
    }
    validate_cyclonedx(bom)
    return bom


def _ancestor(source: ModelSource) -> dict[str, Any]:
    """A CycloneDX pedigree ancestor: the version it was converted from, or the repository it was imported from."""
    digest = source_digest(source)
    hashes = [{"alg": "SHA-256", "content": digest["sha256"]}] if "sha256" in digest else []
    location = source_location(source)
    properties = [
        {"name": "strata:source_kind", "value": source.kind},
        *({"name": f"strata:source_file:{path}", "value": d} for path, d in sorted(source.digests.items())),
    ]
    if source.recipe:
        properties.append({"name": "strata:recipe", "value": source.recipe})
    return {
        "type": "machine-learning-model",
        "name": source.name,
        "version": source.reference,
        **({"hashes": hashes} if hashes else {}),
        **(
            {"externalReferences": [{"type": "distribution", "url": location}]}
            if location and source.kind != CONVERSION
            else {}
        ),
        "properties": properties,
    }
