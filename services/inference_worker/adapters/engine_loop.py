"""One loaded model: its runtime (the engine or llama.cpp: adapters/runtime.py), the one thread that
steps it, and the bridge from its per-request callbacks (called on that thread) to asyncio queues (read
on the event loop)."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from services.inference_worker.adapters.runtime import Runtime, runtime_name
from services.inference_worker.engine import SamplingParams, StreamEvent

log = logging.getLogger(__name__)


@dataclass
class LoopStats:
    steps: int = 0
    tokens: int = 0
    peak_running: int = 0  # the most sequences that were in one batch


@dataclass
class EngineLoop:
    engine: Runtime
    name: str = "model"
    stats: LoopStats = field(default_factory=LoopStats)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        # Model compute lives here, never on the event loop. Concurrent requests share every step:
        # add_request only queues, and step() admits whatever arrived since the last step.
        while not self._stop.is_set():
            if not self.engine.wait_for_work(timeout=0.1):
                continue
            try:
                before = self.engine.stats()["num_running"]
                self.engine.step()
                running = max(before, self.engine.stats()["num_running"])
            except Exception:  # the engine already fails the batch's requests; keep the loop alive
                log.exception("engine step of %s failed", self.name)
                continue
            self.stats.steps += 1
            self.stats.peak_running = max(self.stats.peak_running, running)

    def submit(self, loop: asyncio.AbstractEventLoop, request_id: str, params: SamplingParams, *,
               prompt: str | None = None, messages: list[dict] | None = None,
               cap_max_tokens: bool = True, tools: list[dict] | None = None,
               events: asyncio.Queue[StreamEvent] | None = None) -> asyncio.Queue[StreamEvent]:
        """Queue a request; its stream events arrive on the returned queue (``events`` where given: one
        queue for several requests, told apart by ``request_id``), the last with ``finished`` set.
        Raises ValueError for a request id in use or a template failure, and the engine's
        InvalidRequestError (ContextLengthError: over the context) for a request it cannot run, before
        anything is queued; ``cap_max_tokens`` and ``tools`` as ``LLMEngine.add_request``."""
        events = asyncio.Queue() if events is None else events

        def on_event(event: StreamEvent) -> None:  # on the engine thread
            self.stats.tokens += len(event.token_ids)
            loop.call_soon_threadsafe(events.put_nowait, event)

        self.engine.add_request(prompt, params, messages=messages, request_id=request_id, callback=on_event,
                                reject_invalid=True, cap_max_tokens=cap_max_tokens, tools=tools)
        return events

    def cancel(self, request_id: str) -> bool:
        return self.engine.cancel(request_id)

    @property
    def runtime(self) -> str:
        return runtime_name(self.engine)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping (callers finish or cancel requests first) and let go of the engine."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.engine.fail_embeddings("the model is being unloaded")  # their waiters would otherwise wait forever
        if not self._thread.is_alive():  # llama.cpp's memory is not the GC's to free
            self.engine.close()
