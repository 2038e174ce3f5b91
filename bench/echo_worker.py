"""The stand-in model of bench/platform_overhead.py, and the worker process that serves it.

``EchoEngine`` answers every request with its prompt in the next step; run as a script, this file is
``strata serve inference-worker`` (the real service: deploy flow, ``Server``, ``EngineLoop``) with the
engine swapped in through the ``Deployments._load`` seam, deploying itself at start.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "echo"


# ---- the stand-in model --------------------------------------------------------------------------
class EchoEngine:
    """The slice of LLMEngine that EngineLoop and Server use; every request finishes in the next
    step with its prompt as the text (one 'token' per request)."""

    tokenizer = None
    max_model_len = 1 << 20
    can_generate, can_embed = True, False

    def fail_embeddings(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __init__(self) -> None:
        from types import SimpleNamespace

        self._lock = threading.Lock()
        self._work = threading.Event()
        self._pending: list[tuple[str, str, object]] = []
        self.scheduler = SimpleNamespace(running=[])

    def add_request(self, prompt=None, params=None, *, messages=None, request_id=None, callback=None) -> str:
        text = prompt if prompt is not None else (messages[-1]["content"] if messages else "")
        with self._lock:
            self._pending.append((request_id, text, callback))
            self._work.set()
        return request_id

    def wait_for_work(self, timeout: float | None = None) -> bool:
        return self._work.wait(timeout)

    def cancel(self, request_id: str) -> bool:
        return False

    def step(self) -> list:
        from services.inference_worker.api import RequestMetrics, StreamEvent

        with self._lock:
            batch, self._pending = self._pending, []
            self._work.clear()
        now = time.time()
        for rid, text, callback in batch:
            metrics = RequestMetrics(arrival_time=now, first_scheduled_time=now, first_token_time=now,
                                     finish_time=now, num_prompt_tokens=1, num_generated_tokens=1)
            callback(StreamEvent(rid, [0], text, [], True, "stop", None, metrics))
        return []


def echo_load(artifact, event):
    """Replaces Deployments._load: no checkpoint, the EchoEngine behind the real EngineLoop."""
    from services.inference_worker.api import EngineLoop
    from shared.events import MeasuredMemory

    return EngineLoop(EchoEngine(), name=f"{MODEL}:{artifact.model.version}"), MeasuredMemory(
        weights=0, kv_cache=0, peak=0
    )


def echo_model():
    from shared.events import ModelId

    return ModelId(name=MODEL, version=1, digest="sha256:" + "0" * 64)


def run_worker() -> None:
    """``strata serve inference-worker`` with the EchoEngine, which deploys itself at start."""
    from services.inference_worker.api import LocalSource, Worker, create_service
    from shared.config import Settings
    from shared.events import DeployScheduled
    from shared.service import run

    service = create_service(Settings.from_env("inference-worker"), artifacts=LocalSource({MODEL: Path(".")}))

    async def deploy_echo() -> None:  # runs after the worker's start (hooks run in order), which provides it
        worker = service.part(Worker)
        worker.deployments._load = echo_load
        worker.deployments.schedule(
            DeployScheduled(
                deployment_id="bench-echo",
                model=echo_model(),
                node_id=worker.node_id,
                device="cpu",
                predicted_bytes=1,
                context_length=2048,
                model_ref=MODEL,
                dtype="float32",
            )
        )

    service.on_start(deploy_echo)
    run(service)


if __name__ == "__main__":
    run_worker()
