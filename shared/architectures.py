"""Which runtime serves which model architecture: the one table that push, fit, deploy and the worker
read, so an architecture nothing can serve is refused at push time, not after a deploy.

Pure data (no torch): model-store and hardware-inventory import it without the engine."""
from __future__ import annotations

from collections.abc import Iterable

ENGINE = "strata-engine"  # services/inference_worker/engine: PyTorch + Triton, safetensors checkpoints

# HF ``architectures`` class name -> engine family; the families differ only by flags (engine/config.py).
ENGINE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # Llama 2/3, SmolLM, TinyLlama
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 and Qwen2.5
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",  # text-only Gemma 3 (gemma3_text)
    "Phi3ForCausalLM": "phi3",  # Phi-3, 3.5 and 4-mini
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

RUNTIMES: dict[str, dict[str, str]] = {ENGINE: ENGINE_ARCHITECTURES}


def runtime_for(architectures: Iterable[str]) -> str | None:
    """The first runtime that serves one of ``architectures`` (a config.json's list), or None."""
    names = list(architectures)
    for runtime, table in RUNTIMES.items():
        if any(a in table for a in names):
            return runtime
    return None


def supported() -> str:
    """'LlamaForCausalLM, ...': for error messages that say what would have worked."""
    return ", ".join(a for table in RUNTIMES.values() for a in table)


def unsupported_reason(architectures: Iterable[str]) -> str:
    names = list(architectures)
    return f"unsupported architecture {(names[0] if len(names) == 1 else names)!r}; supported: {supported()}"
