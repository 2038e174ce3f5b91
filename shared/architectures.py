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

LLAMACPP = "llama.cpp"  # services/inference_worker/llamacpp: llama-cpp-python, GGUF files

# GGUF general.architecture -> itself: the decoder-only text models llama.cpp loads that the tests or
# users have run through Strata. A GGUF is served by llama.cpp whatever its name says; this table only
# decides whether push warns (as for an unknown HF class), since llama.cpp knows many more.
LLAMACPP_ARCHITECTURES: dict[str, str] = {a: a for a in (
    "llama", "mistral3", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3", "phi2", "phi3",
    "olmo2", "granite", "granitemoe", "starcoder2", "deepseek2", "command-r", "falcon", "gpt2", "stablelm",
    "internlm2", "exaone", "smollm3", "gpt-oss")}

RUNTIMES: dict[str, dict[str, str]] = {ENGINE: ENGINE_ARCHITECTURES, LLAMACPP: LLAMACPP_ARCHITECTURES}
HF_RUNTIMES = (ENGINE,)  # the runtimes chosen by a config.json's architectures; GGUF picks llama.cpp by format


def runtime_for(architectures: Iterable[str]) -> str | None:
    """The first runtime that serves one of ``architectures`` (a config.json's list), or None."""
    names = list(architectures)
    for runtime in HF_RUNTIMES:
        if any(a in RUNTIMES[runtime] for a in names):
            return runtime
    return None


def runtime_for_gguf(architecture: str | None) -> str | None:
    """llama.cpp for a GGUF whose general.architecture it is known to load, else None (push warns)."""
    return LLAMACPP if architecture in LLAMACPP_ARCHITECTURES else None


def supported() -> str:
    """'LlamaForCausalLM, ...': for error messages that say what would have worked."""
    return ", ".join(a for runtime in HF_RUNTIMES for a in RUNTIMES[runtime])


def unsupported_reason(architectures: Iterable[str]) -> str:
    names = list(architectures)
    return f"unsupported architecture {(names[0] if len(names) == 1 else names)!r}; supported: {supported()}"
