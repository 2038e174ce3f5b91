"""inference-worker's public surface for use in another process's own code: bench/ and other tools import
these names, never the modules behind them (tests/foundation/test_contracts.py checks it).

- The engine, to run a model in this process: ``LLMEngine`` with its ``EngineConfig`` (``parse_dtype``
  reads a dtype as the worker does), ``SamplingParams`` and a guided-decoding ``Constraint``; what it
  streams (``StreamEvent``, ``RequestMetrics``); llama.cpp's engine for GGUF models, ``LlamaCppEngine``
  (``init_backend`` first routes its log to Python's logging).
- A worker, in this process: ``create_service`` with ``WorkerOptions``, and its ``Worker`` part; below
  it, the ``Deployments`` it holds (``Deployment``, ``EngineOptions``), the ``Server`` that answers a
  deployment's requests, the ``EngineLoop`` that drives an engine, and ``LocalSource`` (model files from a
  local directory instead of model-store).

These are the worker's own code; the serving contract it answers (requests, replies, jobs) is in
shared/inference.py and shared/embeddings.py, and its typed client is shared/inference_client.py.
"""

from services.inference_worker.adapters.artifacts import LocalSource
from services.inference_worker.adapters.engine_loop import EngineLoop
from services.inference_worker.engine import (
    Constraint, EngineConfig, LLMEngine, RequestMetrics, SamplingParams, StreamEvent,
)
from services.inference_worker.engine.config import parse_dtype
from services.inference_worker.entrypoints.app import WorkerOptions, create_service
from services.inference_worker.llamacpp import LlamaCppEngine
from services.inference_worker.llamacpp.engine import init_backend
from services.inference_worker.service_layer.deployments import Deployment, Deployments, EngineOptions
from services.inference_worker.service_layer.serving import Server
from services.inference_worker.service_layer.worker import Worker

__all__ = [
    "Constraint", "Deployment", "Deployments", "EngineConfig", "EngineLoop", "EngineOptions", "LLMEngine",
    "LlamaCppEngine", "LocalSource", "RequestMetrics", "SamplingParams", "Server", "StreamEvent", "Worker",
    "WorkerOptions", "create_service", "init_backend", "parse_dtype",
]
