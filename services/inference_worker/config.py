"""The worker's own settings (``STRATA_INFERENCE_WORKER_*``), beside the shared ones every service reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shared.config import env_name, env_value

from services.inference_worker.service_layer.deployments import EngineOptions
from services.inference_worker.service_layer.jobs import JobOptions
from services.inference_worker.service_layer.residency import LOAD_TIMEOUT_S

NAME = "inference-worker"


@dataclass
class WorkerOptions:
    max_inflight: int = 256  # requests admitted on this worker; beyond: 'unavailable' (overloaded, retry)
    engine: EngineOptions = field(default_factory=EngineOptions)
    jobs: JobOptions = field(default_factory=JobOptions)
    load_timeout_s: float = LOAD_TIMEOUT_S  # an on-demand model's first request waits this long for its load
    ondemand_memory_bytes: int | None = None  # memory for on-demand models; None: what the device has free
    keep_alive_tick_s: float = 0.25  # how often idle on-demand models are looked for

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerOptions:
        env = os.environ if environ is None else environ

        def get(key: str, default, cast=int):
            return env_value(env, env_name(NAME, key), default, cast)

        return cls(max_inflight=get("max_inflight", 256),
                   engine=EngineOptions(max_num_seqs=get("max_num_seqs", 64),
                                        default_kv_cache_bytes=get("kv_cache_bytes", None),
                                        compile_decode=get("compile_decode", "off", _compile_decode)),
                   jobs=JobOptions(ack_wait_s=get("job_ack_wait", 30.0, float), concurrency=get("job_concurrency", 8)),
                   load_timeout_s=get("load_timeout", LOAD_TIMEOUT_S, float),
                   ondemand_memory_bytes=get("ondemand_memory_bytes", None))


def _compile_decode(text: str) -> str:
    if text not in ("off", "auto"):
        raise ValueError("must be off or auto (auto: CPU deployments of dense models compile their decode step "
                         "at load)")
    return text
