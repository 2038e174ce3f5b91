"""``python -m tests.faults.worker_main``: a real inference-worker process (``strata serve
inference-worker`` with the same Settings, options and uvicorn runtime) whose checkpoints come from
local directories instead of model-store, so a fault case needs no model push. Checkpoints are
named by ``STRATA_FAULTS_CHECKPOINTS`` (JSON: model name -> directory)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.inference_worker.adapters.artifacts import LocalSource
from services.inference_worker.entrypoints.app import create_service
from shared.service import run

if __name__ == "__main__":
    paths = {name: Path(path) for name, path in json.loads(os.environ["STRATA_FAULTS_CHECKPOINTS"]).items()}
    run(create_service(artifacts=LocalSource(paths)))
