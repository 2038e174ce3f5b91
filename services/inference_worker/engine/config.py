"""Model configuration parsed from a Hugging Face ``config.json``, and the engine's own settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.architectures import ENGINE_ARCHITECTURES as SUPPORTED_ARCHITECTURES

from .errors import ConfigError, MissingFileError, UnsupportedArchitectureError
from .rope import Rope, parse_rope

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
    """One decoder; the families differ only in these fields (see FAMILIES for what each sets)."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope: Rope = field(default_factory=Rope)
    local_rope: Rope | None = None  # Gemma 3: the sliding layers' own RoPE
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    layer_windows: list[int | None] = field(default_factory=list)  # per layer; None: global attention
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    norms: str = "pre"  # pre: Llama; sandwich: Gemma (pre and post); post: OLMo 2 (post only)
    qk_norm: str | None = None  # head: per-head (Qwen3, Gemma 3); full: over the projection (OLMo 2)
    embed_scale: float = 1.0  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: float = 1.0  # Granite: each block's output is scaled before the residual add
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: score = c * tanh(score / c)
    final_softcap: float | None = None
    logits_scale: float = 1.0  # Granite: logits are divided by logits_scaling
    num_experts: int = 0  # MoE (Mixtral, Qwen3-MoE): 0 is a dense MLP
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_weights_in_model_dtype: bool = False  # Qwen3-MoE rounds the top-k weights; Mixtral keeps fp32
    moe_layers: list[bool] = field(default_factory=list)
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def rope_scaling(self) -> dict | None:
        return self.rope.scaling

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

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
        flags = FAMILIES.get(family, {})

        def need(key):
            if d.get(key) is None:
                raise ConfigError(f"{source}: required field {key!r} is missing", path=source)
            return d[key]

        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        act = ACTIVATIONS.get(act)
        if act is None:
            raise ConfigError(f"{source}: activation {d.get('hidden_activation') or d.get('hidden_act')!r} "
                              f"is not supported (supported: {', '.join(ACTIVATIONS)})", path=source)
        hidden, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        n_layers = int(need("num_hidden_layers"))
        n_kv = int(d.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv}", path=source)
        head_dim = int(d.get("head_dim") or hidden // n_heads)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE", path=source)
        rope = parse_rope(d, head_dim, source, *(("full_attention", 1e6) if family == "gemma3" else ()))
        local_rope = parse_rope(d, head_dim, source, "sliding_attention", default_theta=float(
            d.get("rope_local_base_freq", 10000.0))) if family == "gemma3" else None
        window = int(d["sliding_window"]) if d.get("sliding_window") else None
        windows = _layer_windows(d, family, n_layers, window, source)
        experts = int(d.get("num_local_experts") or d.get("num_experts") or 0)
        if flags.get("qkv_bias"):
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch, family=family, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=n_layers,
            num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=rope, local_rope=local_rope,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            sliding_window=window if any(windows) else None, layer_windows=windows,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", flags.get("tie_word_embeddings", False))),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(d.get("mlp_bias", False)), hidden_act=act,
            norm_offset=flags.get("norm_offset", 0.0), norms=flags.get("norms", "pre"),
            qk_norm=flags.get("qk_norm"),
            embed_scale=hidden ** 0.5 if flags.get("scaled_embedding") else float(
                d.get("embedding_multiplier", 1.0)),
            residual_scale=float(d.get("residual_multiplier", 1.0)),
            attn_scale=_attn_scale(d), attn_softcap=_opt_float(d.get("attn_logit_softcapping")),
            final_softcap=_opt_float(d.get("final_logit_softcapping")),
            logits_scale=float(d.get("logits_scaling", 1.0)),
            num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            router_weights_in_model_dtype=flags.get("router_weights_in_model_dtype", False),
            moe_layers=_moe_layers(d, n_layers, experts),
            torch_dtype=_safe_dtype(d.get("torch_dtype") or d.get("dtype")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_list(eos),
        )


# What sets each family apart; everything else is read from config.json's own fields.
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "granite": {}, "phi3": {}, "mixtral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": "head"},
    "qwen3_moe": {"qk_norm": "head", "router_weights_in_model_dtype": True},
    "gemma2": {"norm_offset": 1.0, "norms": "sandwich", "scaled_embedding": True, "tie_word_embeddings": True},
    "gemma3": {"norm_offset": 1.0, "norms": "sandwich", "scaled_embedding": True, "tie_word_embeddings": True,
               "qk_norm": "head"},
    "olmo2": {"norms": "post", "qk_norm": "full"},
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _layer_windows(d: dict, family: str, n_layers: int, window: int | None, source: str) -> list[int | None]:
    """Which layers attend within the sliding window. transformers >= 5 writes ``layer_types``; older
    configs imply it per family."""
    types = d.get("layer_types")
    if types is not None:
        if len(types) != n_layers:
            raise ConfigError(f"{source}: layer_types has {len(types)} entries for {n_layers} layers",
                              path=source)
        if "sliding_attention" in types and window is None:
            raise ConfigError(f"{source}: layer_types has sliding layers but sliding_window is not set",
                              path=source)
        return [window if t == "sliding_attention" else None for t in types]
    if window is None:
        return [None] * n_layers
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        first = int(d.get("max_window_layers", 0))
        return [window if d.get("use_sliding_window") and i >= first else None for i in range(n_layers)]
    if family == "gemma2":
        return [window if i % 2 == 0 else None for i in range(n_layers)]
    if family == "gemma3":
        pattern = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)))
        return [window if (i + 1) % pattern else None for i in range(n_layers)]
    return [window] * n_layers  # Mistral, Phi-3, Mixtral: every layer


def _moe_layers(d: dict, n_layers: int, experts: int) -> list[bool]:
    if not experts:
        return [False] * n_layers
    dense, step = set(d.get("mlp_only_layers") or []), int(d.get("decoder_sparse_step") or 1)
    return [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]


def _attn_scale(d: dict) -> float | None:
    if d.get("query_pre_attn_scalar"):  # Gemma
        return float(d["query_pre_attn_scalar"]) ** -0.5
    if d.get("attention_multiplier") is not None:  # Granite
        return float(d["attention_multiplier"])
    return None


def _opt_float(v) -> float | None:
    return float(v) if v else None


def _as_id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _safe_dtype(v):
    try:
        return parse_dtype(v)
    except ValueError:
        return None


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [rotary dims // 2] of the global layers, in fp32, as transformers computes them."""
    return cfg.rope.inv_freq()


@dataclass
class EngineConfig:
    """How the engine runs a model. Sizes of the KV cache: num_blocks wins over kv_cache_bytes;
    with neither, CUDA uses gpu_memory_utilization of the card and CPU uses what
    max_num_seqs * max_model_len needs, capped at cpu_kv_cache_bytes."""
    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | torch.dtype | None = None  # None: see engine/dtypes.py (16 bits for a 16-bit checkpoint)
    quantize: str | None = None  # weight-only quantization of the linear layers: int8 or int4 (engine/quant.py)
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # per step; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # default: max_position_embeddings
    # decode steps through torch.compile, compiled at load (engine/compiled_decode.py): "on" refuses a model or
    # device it does not cover (CUDA, MoE); "auto" compiles where it can and runs the rest eager
    compile_decode: str = "off"

    def __post_init__(self):
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.compile_decode not in ("off", "on", "auto"):
            raise ValueError(f"compile_decode must be off, on or auto, got {self.compile_decode!r}")
