"""Checking an artifact directory against its training record, and comparing two runs' weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from .config import RECORD_NAME, TrainError
from .data import sha256_file


def verify_artifact(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Check that every file listed in the record hashes to the recorded sha256; returns the
    record. Raises ``TrainError`` naming the first file that is missing or differs."""
    d = Path(model_dir)
    try:
        record = json.loads((d / RECORD_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{d / RECORD_NAME}: cannot read the training record: {e}") from e
    for name, meta in record.get("files", {}).items():
        path = d / name
        if not path.is_file():
            raise TrainError(f"{path}: listed in {RECORD_NAME} but missing")
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise TrainError(f"{path}: sha256 {digest} differs from the record's {meta['sha256']}")
    return record


def compare_weights(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict[str, Any]:
    """How far apart two checkpoints' weights are: identical bits, or the max abs difference."""
    from safetensors.torch import load_file

    a = load_file(str(Path(dir_a) / "model.safetensors"))
    b = load_file(str(Path(dir_b) / "model.safetensors"))
    if a.keys() != b.keys():
        return {"identical": False, "reason": "different tensor names",
                "only_a": sorted(a.keys() - b.keys()), "only_b": sorted(b.keys() - a.keys())}
    max_diff, differing = 0.0, []
    for k in sorted(a):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            return {"identical": False, "reason": f"{k}: shape/dtype differ"}
        if not (a[k] == b[k]).all():
            differing.append(k)
            max_diff = max(max_diff, (a[k].float() - b[k].float()).abs().max().item())
    return {"identical": not differing, "differing_tensors": len(differing),
            "max_abs_diff": max_diff}
