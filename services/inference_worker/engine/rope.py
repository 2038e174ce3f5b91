"""Rotary position embedding parameters from a config.json, and their cos/sin tables, as transformers
computes them: default, linear, llama3 and longrope (Phi-3 "su") scaling, partial rotary dims."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    dim: int = 0  # rotary dims of a head (partial_rotary_factor * head_dim); the rest pass through
    scaling: dict | None = None  # None, or {"rope_type": ..., its parameters}

    @property
    def long_from(self) -> int | None:
        """longrope: a sequence longer than this many tokens uses the long factors."""
        s = self.scaling
        return s["original_max_position_embeddings"] if s and s["rope_type"] == "longrope" else None

    def inv_freq(self, long: bool = False) -> torch.Tensor:
        """Inverse frequencies [dim // 2] in fp32."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        s = self.scaling or {"rope_type": "default"}
        kind = s["rope_type"]
        if kind == "longrope":
            factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
            return 1.0 / (factors * self.theta ** exponent)
        inv = 1.0 / (self.theta ** exponent)
        if kind == "linear":
            return inv / s["factor"]
        if kind == "llama3":
            return _llama3(inv, s)
        return inv

    @property
    def attention_factor(self) -> float:
        s = self.scaling
        return s["attention_factor"] if s and s["rope_type"] == "longrope" else 1.0

    def tables(self, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, dim // 2] in fp32. longrope stacks the short then the long table, so row
        ``pos + max_len`` is position ``pos`` with the long factors."""
        sets = [False, True] if self.long_from else [False]
        pos = torch.arange(max_len, device=device, dtype=torch.float32)[:, None]
        freqs = torch.cat([pos * self.inv_freq(long).to(device) for long in sets])
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def parse_rope(d: dict, head_dim: int, source: str, layer_type: str | None = None,
               default_theta: float = 10000.0) -> Rope:
    """Both the transformers<5 layout (rope_theta + rope_scaling) and >=5 (rope_parameters, per
    layer type for Gemma 3)."""
    params = dict(d.get("rope_parameters") or {})
    per_layer_type = any(isinstance(v, dict) for v in params.values())
    if per_layer_type:  # Gemma 3 in transformers >= 5
        params = dict(params.get(layer_type or "full_attention") or {})
    elif layer_type == "sliding_attention":  # Gemma 3 before: local layers unscaled, their own base
        params = {"rope_theta": default_theta}
    legacy = d.get("rope_scaling")
    if legacy and layer_type != "sliding_attention":
        params = {**params, **legacy}
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
    partial = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * partial)
    if dim % 2 or dim < 2:
        raise ConfigError(f"{source}: rotary dims {dim} (head_dim {head_dim} x partial_rotary_factor "
                          f"{partial}) must be even for RoPE", path=source)
    kind = params.get("rope_type", params.get("type")) or "default"
    kind = {"su": "longrope"}.get(kind, kind)
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; supported: "
                          f"{', '.join(ROPE_TYPES)}", path=source)
    if kind == "default":
        return Rope(theta, dim)
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "longrope": ("long_factor", "short_factor")}[kind]
    missing = [k for k in need if params.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: {kind} rope scaling lacks {', '.join(missing)}", path=source)
    original = int(params.get("original_max_position_embeddings")
                   or d.get("original_max_position_embeddings") or d.get("max_position_embeddings") or 8192)
    scaling: dict = {"rope_type": kind, "original_max_position_embeddings": original}
    if kind == "longrope":
        for k in ("long_factor", "short_factor"):
            scaling[k] = [float(x) for x in params[k]]
            if len(scaling[k]) != dim // 2:
                raise ConfigError(f"{source}: longrope {k} has {len(scaling[k])} entries, expected "
                                  f"{dim // 2}", path=source)
        factor = params.get("factor") or (d.get("max_position_embeddings") or original) / original
        scaling["attention_factor"] = float(params.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))))
    else:
        scaling.update({k: float(params[k]) for k in need})
    return Rope(theta, dim, scaling)
