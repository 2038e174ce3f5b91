"""What the worker needs of a loaded model, whichever runtime runs it: Strata's PyTorch engine
(engine/LLMEngine, safetensors checkpoints) or llama.cpp (llamacpp/LlamaCppEngine, GGUF files).

The engine loop steps it, the serving layer submits and cancels requests and reads its tokenizer
(chat template, tool formats, logprob pieces), and the deployment reports its memory and stats. Both
runtimes stream the same StreamEvents, so receipts, metrics and replies do not know which ran. The
runtime is chosen by the files' format (``runtime_of``), the one place that knows both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from shared.architectures import ENGINE, LLAMACPP

from services.inference_worker.engine import SamplingParams, Tokenizer
from services.inference_worker.engine.sequence import Callback


class Runtime(Protocol):
    tokenizer: Tokenizer | None
    max_model_len: int
    can_generate: bool  # False: an embedding checkpoint without its LM head
    can_embed: bool  # False: /v1/embeddings is refused, naming the runtime

    def fail_embeddings(self, reason: str) -> None: ...  # at unload: queued embeddings end with this error

    def close(self) -> None: ...  # at unload, after the loop stopped: memory the GC does not own

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
        callback: Callback | None = None,
        reject_invalid: bool = False,
        cap_max_tokens: bool = True,
        tools: list[dict] | None = None,
    ) -> str: ...

    def cancel(self, request_id: str) -> bool: ...

    def wait_for_work(self, timeout: float | None = None) -> bool: ...

    def step(self) -> list: ...

    def compile(self, constraint: Any) -> Any: ...

    def stats(self) -> dict: ...

    def generate(self, prompts: Any, params: SamplingParams | None = None) -> list: ...

    @property
    def weights_bytes(self) -> int: ...

    def cache_usage(self) -> Any: ...


def runtime_of(path: Path) -> str:
    """llama.cpp for a directory holding a GGUF file (llama.cpp's format), else the engine."""
    return LLAMACPP if gguf_file(path) is not None else ENGINE


def gguf_file(path: Path) -> Path | None:
    """The GGUF to load: the only one, or a split's first part (llama.cpp finds the others beside it)."""
    files = sorted(path.glob("*.gguf")) if path.is_dir() else ([path] if path.suffix == ".gguf" else [])
    return files[0] if files else None


def runtime_name(engine: object) -> str:
    return getattr(engine, "runtime", ENGINE)
