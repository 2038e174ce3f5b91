"""What each event adds to the lineage index: plain functions from an event to index rows.

The index is derived from the leaves (it can be rebuilt from them) and answers the two questions
of the brief: which data and which model version were behind an answer, and which answers came
from models trained on a dataset.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from shared.events import (
    DatasetRegistered,
    DeployFailed,
    DeployLoading,
    DeployReady,
    DeployScheduled,
    DeployUnloaded,
    EmbeddingsCompleted,
    Event,
    InferenceCompleted,
    ModelLoaded,
    ModelLoadFailed,
    ModelRegistered,
    ModelUnloaded,
    NodeRegistered,
)


class IndexRow(NamedTuple):
    table: str
    values: dict[str, Any]


class ModelKey(NamedTuple):
    name: str | None
    version: int | None
    digest: str | None


def ref_name(ref: str) -> str:
    """``tiny``, ``tiny:3`` and ``tiny@prod`` all name the model ``tiny``."""
    for sep in ("@", ":"):
        ref = ref.split(sep, 1)[0]
    return ref


def model_key(data: Any) -> ModelKey:
    """The model an event is about, for the audit index (None for events about no model)."""
    model = getattr(data, "model", None)
    if model is not None:
        return ModelKey(model.name, model.version, model.digest)
    ref = getattr(data, "model_ref", None)
    if isinstance(ref, str):
        return ModelKey(ref_name(ref), None, None)
    return ModelKey(None, None, None)


def index_rows(event: Event[Any], index: int, time_ms: int) -> list[IndexRow]:
    d = event.data
    base = {"idx": index, "event_id": event.id, "time_ms": time_ms}
    if isinstance(d, InferenceCompleted | EmbeddingsCompleted):  # an embeddings request gets its receipt too (#18)
        return [IndexRow("inferences", {
            **base, "request_id": d.request_id, "model_name": d.model.name, "model_version": d.model.version,
            "model_digest": d.model.digest, "deployment_id": d.deployment_id, "node_id": d.node_id, "device": d.device,
        })]
    if isinstance(d, ModelRegistered):
        rows = [IndexRow("models", {
            **base, "digest": d.model.digest, "name": d.model.name, "version": d.model.version,
            "architecture": d.architecture, "parameters": d.parameters, "training_record": d.training_record,
            "license": d.license,
        })]
        rows += [
            IndexRow("model_datasets", {"model_digest": d.model.digest, "dataset_digest": ds}) for ds in d.datasets
        ]
        if d.source is not None:  # an import's origin, or a conversion's source version (derived_from)
            rows.append(
                IndexRow(
                    "model_sources",
                    {
                        "model_digest": d.model.digest,
                        "kind": d.source.kind,
                        "name": d.source.name,
                        "reference": d.source.reference,
                        "resolved": d.source.resolved,
                        "derived_from": d.source.derived_from,
                        "digests": d.source.digests,
                        "recipe": d.source.recipe,
                    },
                )
            )
        return rows
    if isinstance(d, DatasetRegistered):
        return [
            IndexRow(
                "datasets",
                {
                    **base,
                    "digest": d.digest,
                    "name": d.name,
                    "source": d.source,
                    "license": d.license,
                    "files": len(d.files),
                },
            )
        ]
    if isinstance(
        d,
        (
            DeployScheduled,
            DeployLoading,
            DeployReady,
            DeployUnloaded,
            DeployFailed,
            ModelLoaded,
            ModelUnloaded,
            ModelLoadFailed,
        ),
    ):
        return [
            IndexRow(
                "deployments",
                {
                    **base,
                    "deployment_id": d.deployment_id,
                    "event_type": event.type,
                    "model_digest": d.model.digest if d.model else None,
                    "node_id": d.node_id,
                    "device": getattr(d, "device", None),
                },
            )
        ]
    if isinstance(d, NodeRegistered):
        return [
            IndexRow(
                "nodes",
                {
                    **base,
                    "node_id": d.node_id,
                    "hostname": d.hostname,
                    "devices": [dev.model_dump(mode="json") for dev in d.devices],
                },
            )
        ]
    return []
