"""The llama.cpp runtime: GGUF models through llama-cpp-python's low-level API (the worker's ``llama``
extra), behind the same interface as the engine (adapters/runtime.py)."""
from .engine import RUNTIME, InvalidGguf, LlamaCppEngine

__all__ = ["RUNTIME", "InvalidGguf", "LlamaCppEngine"]
