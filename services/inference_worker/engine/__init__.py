"""The inference engine: Llama-family models over a paged KV cache with continuous batching.

    from services.inference_worker.engine import LLMEngine, SamplingParams
    engine = LLMEngine.from_pretrained("path/to/checkpoint")
    print(engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))[0].text)
"""
from .block_manager import BlockManager, CacheUsage
from .config import EngineConfig, ModelConfig
from .engine import LLMEngine
from .errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    MissingFileError,
    MissingTensorError,
    PickleCheckpointError,
    ShapeMismatchError,
    TokenizerError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from .guided import Constraint, GrammarError
from .loader import Checkpoint, GenerationDefaults, load_checkpoint
from .sampling import SamplingParams, TokenLogprob
from .sequence import RequestMetrics, RequestOutput, StreamEvent
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "BlockManager",
    "CacheUsage",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "Constraint",
    "ContextLengthError",
    "EngineConfig",
    "GenerationDefaults",
    "GrammarError",
    "IncrementalDetokenizer",
    "InvalidRequestError",
    "LLMEngine",
    "MissingFileError",
    "MissingTensorError",
    "ModelConfig",
    "PickleCheckpointError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "ShapeMismatchError",
    "StreamEvent",
    "TokenLogprob",
    "Tokenizer",
    "TokenizerError",
    "UnexpectedTensorError",
    "UnsupportedArchitectureError",
    "load_checkpoint",
]
