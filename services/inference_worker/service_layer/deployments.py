"""The models this worker holds: deploy-scheduled → fetch (verified) → load → warm up → measure →
deploy-ready, or deploy-failed with the reason; undeploy → drain → unload → deploy-unloaded.

No NATS here: events go out through ``publish`` and the entrypoint learns through ``on_serving``
when a model name gains its first ready deployment or loses its last one (it then subscribes to or
unsubscribes from that name's request subject)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from shared.catalog import ModelRef
from shared.errors import NotFound, Unavailable
from shared.events import (
    DEFAULT_KEEP_ALIVE_S,
    DeployFailed,
    DeployLoading,
    DeployReady,
    DeployScheduled,
    DeployUnloaded,
    EventData,
    MeasuredMemory,
    ModelId,
)
from services.inference_worker.adapters.artifacts import Artifact, ArtifactSource
from services.inference_worker.adapters.engine_loop import EngineLoop
from services.inference_worker.adapters.memory import MemoryProbe
from services.inference_worker.adapters.runtime import Runtime, gguf_file, runtime_of
from shared.architectures import LLAMACPP

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed"]
Publish = Callable[[EventData], Awaitable[object]]
OnServing = Callable[[str, bool], Awaitable[None]]  # (model name, serving now?)
MakeRoom = Callable[[str, int, str], Awaitable[None]]  # (device, bytes, deployment id): residency.py's eviction
DRAIN_TIMEOUT_S = 60.0


@dataclass
class EngineOptions:
    """Worker-wide engine settings; a deployment's own figures (context, KV cache size, dtype) win."""

    max_num_seqs: int = 64
    default_kv_cache_bytes: int | None = None
    warmup_tokens: int = 2
    compile_decode: str = "off"  # the engine's compiled decode step: off, or auto (where it applies; at load)


@dataclass
class Deployment:
    key: str  # deployment_id/replica: two replicas of one deployment may share a node
    deployment_id: str
    replica: int
    generation: int
    model: ModelId
    device: str
    state: State = "loading"
    aliases: tuple[str, ...] = ()
    loop: EngineLoop | None = None
    measured: MeasuredMemory | None = None
    load_seconds: float = 0.0
    reason: str | None = None
    inflight: set[str] = field(default_factory=set)
    unload_requested: bool = False
    # on-demand (service_layer/residency.py): "ready" with no loop until a request loads it
    on_demand: bool = False
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    booked_bytes: int = 0  # the fit's booking: what a load is expected to need
    last_used: float = 0.0  # the residency clock's time of the last request's start or end
    artifact: Artifact | None = None  # fetched and verified at deploy: loads read it
    scheduled: DeployScheduled | None = None

    def matches(self, ref: ModelRef) -> bool:
        if ref.name != self.model.name:
            return False
        if ref.version is not None:
            return ref.version == self.model.version
        return ref.alias is None or ref.alias in self.aliases


def deployment_key(deployment_id: str, replica: int) -> str:
    return f"{deployment_id}/{replica}"


class Deployments:
    def __init__(
        self,
        node_id: str,
        artifacts: ArtifactSource,
        publish: Publish,
        on_serving: OnServing,
        options: EngineOptions | None = None,
    ) -> None:
        self.node_id, self.artifacts, self.publish, self.on_serving = node_id, artifacts, publish, on_serving
        self.options = options or EngineOptions()
        self.by_key: dict[str, Deployment] = {}
        self._load_lock = asyncio.Lock()  # one load at a time: memory figures must not mix
        self._tasks: set[asyncio.Task[None]] = set()  # unloads
        self._loads: set[asyncio.Task[None]] = set()
        self.make_room: MakeRoom | None = None  # before an always-on load: idle on-demand models make way

    # ---- queries --------------------------------------------------------------------------
    def ready(self, name: str) -> list[Deployment]:
        return [d for d in self.by_key.values() if d.state == "ready" and d.model.name == name]

    def pick(self, ref: ModelRef) -> Deployment:
        """The ready deployment with the fewest requests in flight that serves ``ref`` (an on-demand
        one may be unloaded: its ``loop`` is None until residency.py loads it)."""
        candidates = [d for d in self.ready(ref.name) if d.matches(ref)]
        if not candidates:
            held = sorted({f"{d.model.name}:{d.model.version}" for d in self.ready(ref.name)})
            if held:
                raise NotFound(f"{ref} is not deployed on this worker (it serves {', '.join(held)})")
            raise Unavailable(f"{ref.name} is being unloaded on this worker, retry")
        return min(candidates, key=lambda d: (d.loop is None, len(d.inflight)))  # a loaded one before an unloaded one

    # ---- deploy ---------------------------------------------------------------------------
    def schedule(self, event: DeployScheduled) -> bool:
        """Start loading in the background (the event is acknowledged at once; a load can take
        minutes). Idempotent: a redelivered or repeated event for a deployment held in the same or
        a later generation does nothing. True when a load started."""
        if event.node_id != self.node_id:
            return False
        key = deployment_key(event.deployment_id, event.replica)
        held = self.by_key.get(key)
        if held is not None and (held.state != "failed" or held.generation >= event.generation):
            return False
        dep = Deployment(
            key=key,
            deployment_id=event.deployment_id,
            replica=event.replica,
            generation=event.generation,
            model=event.model,
            device=event.device,
            on_demand=event.on_demand,
            keep_alive_s=event.keep_alive_s,
            booked_bytes=event.booked_bytes or event.predicted_bytes,
            scheduled=event,
        )
        self.by_key[key] = dep
        self._spawn(self._deploy(dep, event), self._loads)
        return True

    async def _deploy(self, dep: Deployment, event: DeployScheduled) -> None:
        await self.publish(
            DeployLoading(deployment_id=dep.deployment_id, model=dep.model, node_id=self.node_id, device=dep.device)
        )
        started = time.monotonic()
        try:
            artifact = await self.artifacts.fetch(dep.model, event.model_ref or f"{dep.model.name}:{dep.model.version}")
            if dep.on_demand:  # fetched and verified now; loaded by its first request
                await self._serve_unloaded(dep, artifact)
                return
            if self.make_room is not None:
                await self.make_room(dep.device, dep.booked_bytes, dep.deployment_id)
            async with self._load_lock:
                loop, measured = await asyncio.to_thread(self._load, artifact, event)
        except Exception as exc:  # every failure ends in deploy.failed, never in a dead worker
            dep.state, dep.reason = "failed", failure_reason(exc)
            log.warning("deploy %s of %s:%s failed: %s", dep.key, dep.model.name, dep.model.version, dep.reason)
            await self.publish(
                DeployFailed(deployment_id=dep.deployment_id, model=dep.model, node_id=self.node_id, reason=dep.reason)
            )
            return
        dep.loop, dep.measured, dep.aliases = loop.start(), measured, artifact.aliases
        dep.load_seconds = time.monotonic() - started
        dep.state = "ready"
        if len(self.ready(dep.model.name)) == 1:  # serving before it says ready: a client may act on it
            await self.on_serving(dep.model.name, True)
        await self.publish(
            DeployReady(
                deployment_id=dep.deployment_id,
                model=dep.model,
                node_id=self.node_id,
                device=dep.device,
                measured=measured,
                load_seconds=dep.load_seconds,
                runtime=loop.runtime,
                **served_weights(loop.engine),
            )
        )
        if dep.unload_requested:
            await self.unload(dep.key)

    async def _serve_unloaded(self, dep: Deployment, artifact: Artifact) -> None:
        dep.artifact, dep.aliases, dep.state = artifact, artifact.aliases, "ready"
        if len(self.ready(dep.model.name)) == 1:
            await self.on_serving(dep.model.name, True)
        await self.publish(
            DeployReady(
                deployment_id=dep.deployment_id,
                model=dep.model,
                node_id=self.node_id,
                device=dep.device,
                measured=MeasuredMemory(weights=0, kv_cache=0, peak=0),
                load_seconds=0.0,
                runtime=runtime_of(artifact.path),
                on_demand=True,
            )
        )
        if dep.unload_requested:
            await self.unload(dep.key)

    async def load_resident(self, dep: Deployment) -> None:
        """Load an on-demand deployment now (residency.py decides when). On failure nothing stays:
        the half-built engine is dropped and its memory released."""
        assert dep.artifact is not None and dep.scheduled is not None
        started = time.monotonic()
        try:
            async with self._load_lock:
                loop, measured = await asyncio.to_thread(self._load, dep.artifact, dep.scheduled)
        except Exception as exc:
            failure = exc
        else:
            dep.loop, dep.measured, dep.load_seconds = loop.start(), measured, time.monotonic() - started
            return
        failure.__traceback__ = None  # its frames hold the half-built engine: freed with the collection below
        await asyncio.to_thread(_release_memory, dep.device)
        raise failure

    async def unload_resident(self, dep: Deployment) -> None:
        """Free an on-demand deployment's engine; the deployment stays ready (unloaded)."""
        loop, dep.loop = dep.loop, None  # no new request picks this engine from here on
        if loop is not None:
            await asyncio.to_thread(loop.stop)
            del loop
            await asyncio.to_thread(_release_memory, dep.device)

    def _load(self, artifact: Artifact, event: DeployScheduled) -> tuple[EngineLoop, MeasuredMemory]:
        """On a worker thread: load (with the runtime the files' format calls for), warm up and measure."""
        probe = MemoryProbe(torch.device(event.device)).start()
        engine = self._engine(artifact, event)
        try:
            return self._warm_up(engine, artifact, probe)
        except BaseException:
            engine.close()  # llama.cpp's memory is not the GC's to free: a failed warm-up leaves nothing behind
            raise

    def _warm_up(self, engine: Runtime, artifact: Artifact, probe: MemoryProbe) -> tuple[EngineLoop, MeasuredMemory]:
        from services.inference_worker.engine import SamplingParams

        opts = self.options
        # warm-up: one real prefill + decode, so the first user does not pay for lazy initialisation
        if engine.can_generate:
            warm = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=opts.warmup_tokens, temperature=0))[0]
            if warm.finish_reason == "error":
                raise RuntimeError(f"warm-up generation failed: {warm.error}")
        else:  # an embedding model without an LM head
            engine.embed([[1, 2, 3]])
        measured = probe.measure(engine.weights_bytes, engine.cache_usage().total_bytes)
        return EngineLoop(engine, name=f"{artifact.model.name}:{artifact.model.version}"), measured

    def _engine(self, artifact: Artifact, event: DeployScheduled) -> Runtime:
        opts = self.options
        kv_bytes = event.kv_cache_bytes or opts.default_kv_cache_bytes
        if runtime_of(artifact.path) == LLAMACPP:
            from services.inference_worker.llamacpp import LlamaCppEngine

            return LlamaCppEngine(
                gguf_file(artifact.path),
                max_model_len=event.context_length,
                kv_cache_bytes=kv_bytes,
                max_num_seqs=opts.max_num_seqs,
                device=event.device,
            )
        from services.inference_worker.engine import EngineConfig, LLMEngine

        config = EngineConfig(
            device=event.device,
            dtype=event.dtype,
            quantize=event.quantize,
            kv_cache_bytes=kv_bytes,
            max_num_seqs=opts.max_num_seqs,
            compile_decode=opts.compile_decode,
        )
        engine = LLMEngine.from_pretrained(artifact.path, config)
        if event.context_length < engine.max_model_len:
            engine.max_model_len = event.context_length  # what was booked, not what the model allows
        if event.embedding_pooling is not None:  # the deploy's choice wins over the checkpoint's
            engine.pooling = event.embedding_pooling
        return engine

    # ---- undeploy -------------------------------------------------------------------------
    def matching(
        self, *, deployment_id: str | None = None, ref: ModelRef | None = None, replica: int | None = None
    ) -> list[Deployment]:
        out = []
        for d in self.by_key.values():
            if deployment_id is not None and d.deployment_id != deployment_id:
                continue
            if replica is not None and d.replica != replica:
                continue
            if ref is not None and not d.matches(ref):
                continue
            out.append(d)
        return out

    def request_unload(self, dep: Deployment) -> None:
        """Unload in the background (draining may take as long as the longest request)."""
        if dep.state == "loading":
            dep.unload_requested = True  # unloaded as soon as the load finishes
        elif dep.state in ("ready", "failed"):
            self._spawn(self.unload(dep.key))

    async def unload(self, key: str, drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
        dep = self.by_key.get(key)
        if dep is None or dep.state == "draining":
            return
        was_ready, dep.state = dep.state == "ready", "draining"
        if was_ready and not self.ready(dep.model.name):
            await self.on_serving(dep.model.name, False)  # no new requests reach this name
        deadline = time.monotonic() + drain_timeout
        while dep.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if dep.inflight and dep.loop is not None:
            log.warning("%s: cancelling %d requests still running after %.0fs", key, len(dep.inflight), drain_timeout)
            for rid in list(dep.inflight):
                dep.loop.cancel(rid)
            await asyncio.sleep(0.2)
        if dep.loop is not None:
            await asyncio.to_thread(dep.loop.stop)
            dep.loop = None  # drop the engine: its weights and KV cache are freed with it
            await asyncio.to_thread(_release_memory, dep.device)
        del self.by_key[key]
        if was_ready or dep.unload_requested:
            await self.publish(DeployUnloaded(deployment_id=dep.deployment_id, model=dep.model, node_id=self.node_id))

    async def shutdown(self) -> None:
        """SIGTERM: every deployment drains (requests in flight finish) and is unloaded."""
        for task in list(self._loads):  # a load in progress is abandoned (its thread finishes alone)
            task.cancel()
        await asyncio.gather(*self._loads, *self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.unload(k) for k in list(self.by_key)), return_exceptions=True)

    def _spawn(self, coro: Awaitable[None], tasks: set[asyncio.Task[None]] | None = None) -> None:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(_log_failure)


def served_weights(engine: object) -> dict[str, str | bool | None]:
    """Which weights answer (deploy.ready, and so the ledger): the compute dtype, the quantization, and
    whether decode steps run compiled (the same weights, other kernels: results differ by rounding).
    None for an engine that has neither (the bench's EchoEngine)."""
    dtype = getattr(engine, "dtype", None)
    return {
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "quantize": getattr(getattr(engine, "ecfg", None), "quantize", None),
        "compiled_decode": getattr(getattr(engine, "runner", None), "decode_graph", None) is not None,
    }


def _log_failure(task: asyncio.Task[None]) -> None:
    """Said when it happens, not as "Task exception was never retrieved" at garbage collection."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_coro(), exc_info=task.exception())


def failure_reason(exc: BaseException) -> str:
    """A reason an operator can act on: what kind of failure, and the message naming the file."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError):
        return f"out of memory while loading: {exc}"
    from services.inference_worker.engine import CheckpointError, UnsupportedArchitectureError

    if isinstance(exc, UnsupportedArchitectureError):
        return f"unsupported architecture: {exc}"
    if isinstance(exc, CheckpointError):
        return f"bad checkpoint: {exc}"
    name = type(exc).__name__
    if name == "VerificationError":
        return f"verification failed: {exc}"
    return f"{name}: {exc}"


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
