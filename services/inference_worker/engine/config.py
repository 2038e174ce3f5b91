"""Model configuration parsed from a Hugging Face ``config.json``, and the engine's own settings."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, MissingFileError, UnsupportedArchitectureError

# architectures -> family. All are the same decoder block; they differ only in flags read below.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",  # Llama 2/3, SmolLM, TinyLlama, ...
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 and Qwen2.5
}
ROPE_TYPES = ("default", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    name = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16"}.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use one of float32, float16, bfloat16")
    return _DTYPES[name]


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # used only to cap the context length (see engine)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{path}: config.json not found; a checkpoint directory needs one",
                                   path=path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})", path=path) from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"{source}: unsupported architecture {archs or d.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path=source)
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key):
            if d.get(key) is None:
                raise ConfigError(f"{source}: required field {key!r} is missing", path=source)
            return d[key]

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu/SwiGLU)",
                              path=source)
        hidden, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        n_kv = int(d.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv}", path=source)
        head_dim = int(d.get("head_dim") or hidden // n_heads)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE", path=source)
        theta, scaling = _parse_rope(d, source)
        if family == "qwen2":
            window = d.get("sliding_window") if d.get("use_sliding_window") else None
            qkv_bias, o_bias = True, False
        else:
            window = d.get("sliding_window") if family == "mistral" else None
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
            num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(d.get("mlp_bias", False)),
            torch_dtype=_safe_dtype(d.get("torch_dtype") or d.get("dtype")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_list(eos),
        )


def _as_id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _safe_dtype(v):
    try:
        return parse_dtype(v)
    except ValueError:
        return None


def _parse_rope(d: dict, source: str) -> tuple[float, dict | None]:
    """Accept both the transformers<5 layout (rope_theta + rope_scaling) and >=5 (rope_parameters)."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling")
    if legacy:
        params = {**params, **legacy}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                          f"{', '.join(ROPE_TYPES)}", path=source)
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}", path=source)
    scaling = {k: float(params[k]) for k in keys}
    scaling["rope_type"] = "llama3"
    scaling["original_max_position_embeddings"] = int(
        params.get("original_max_position_embeddings") or d.get("max_position_embeddings") or 8192)
    return theta, scaling


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, as transformers computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class EngineConfig:
    """How the engine runs a model. Sizes of the KV cache: num_blocks wins over kv_cache_bytes;
    with neither, CUDA uses gpu_memory_utilization of the card and CPU uses what
    max_num_seqs * max_model_len needs, capped at cpu_kv_cache_bytes."""
    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | torch.dtype | None = None  # None: checkpoint dtype on CUDA, float32 on CPU
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # per step; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # default: max_position_embeddings (and sliding window)

    def __post_init__(self):
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
