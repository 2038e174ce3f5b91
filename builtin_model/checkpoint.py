"""The HF-format checkpoint: config, tensor names and shapes, initial weights, and the model
(our engine's Transformer, or transformers' as a fallback) that trains on them."""

from __future__ import annotations

import math
from typing import Any
from .config import TRAINERS, TrainConfig, TrainError


def hf_config(cfg: TrainConfig, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": cfg.save_dtype,
        "use_cache": True,
    }


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF Llama checkpoint this config describes, name -> shape."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def init_hf_state(config: dict[str, Any], std: float, seed: int) -> dict[str, Any]:
    """The initial weights under HF names, drawn in sorted-name order from ``seed``: the start
    point depends only on the seed and the shapes, not on which module class trains it.
    Norms start at 1; residual-output projections get std / sqrt(2 * layers) (GPT-2 style)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(hf_tensor_shapes(config).items()):
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            s = std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                s = std / math.sqrt(2 * config["num_hidden_layers"])
            out[name] = torch.randn(shape, generator=gen) * s
    return out


class _Backend:
    """The module being trained: [batch, seq] ids -> [batch, seq, vocab] logits, and its
    weights read and written under HF tensor names."""

    name: str
    module: Any

    def logits(self, input_ids):  # pragma: no cover - interface
        raise NotImplementedError

    def hf_state_dict(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def load_hf_state(self, state: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _EngineBackend(_Backend):
    """Our own model (services/inference_worker/engine/model.py). Its forward takes a flat
    batch of tokens with attention metadata; with ``slot_mapping=None`` and no cache it is a
    plain causal forward, one prefill chunk per training sequence. On CPU the kernels are
    the plain-torch references, so autograd flows through them."""

    name = "strata.engine.Transformer"

    def __init__(self, config: dict[str, Any]):
        import torch

        from services.inference_worker.engine.config import ModelConfig
        from services.inference_worker.engine.model import AttentionMetadata, PrefillChunk, Transformer
        from services.inference_worker.engine.weights import hf_weight_names

        self._meta_cls, self._chunk_cls = AttentionMetadata, PrefillChunk
        self.cfg = ModelConfig.from_dict(config, source="builtin train config")
        self.module = Transformer(self.cfg)
        self.module.init_rope(config["max_position_embeddings"])
        self._names = hf_weight_names(self.cfg)
        self._shapes = hf_tensor_shapes(config)
        self._torch = torch

    def logits(self, input_ids):
        torch = self._torch
        b, t = input_ids.shape
        meta = self._meta_cls(slot_mapping=None,
                              prefills=[self._chunk_cls(i * t, (i + 1) * t) for i in range(b)])
        positions = torch.arange(t).repeat(b)
        hidden = self.module(input_ids.reshape(-1), positions, meta)
        return self.module.compute_logits(hidden).view(b, t, -1)

    def hf_state_dict(self) -> dict:
        sd = self.module.state_dict()
        out = {}
        for ours, hf_names in self._names.items():
            rows = [self._shapes[n][0] for n in hf_names]
            for n, part in zip(hf_names, sd[ours].split(rows, dim=0)):
                out[n] = part
        return out

    def load_hf_state(self, state: dict) -> None:
        torch = self._torch
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for ours, hf_names in self._names.items():
                params[ours].copy_(torch.cat([state[n] for n in hf_names], dim=0))


class _TransformersBackend(_Backend):
    # FALLBACK ONLY: used when our engine's model cannot be imported (or when asked for with
    # trainer="transformers"). transformers' LlamaForCausalLM is then the training step's
    # module; the checkpoint it writes is the same HF format either way.
    name = "transformers.LlamaForCausalLM"

    def __init__(self, config: dict[str, Any]):
        from transformers import LlamaConfig, LlamaForCausalLM

        kwargs = {k: v for k, v in config.items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
        hf_cfg = LlamaConfig(**kwargs)
        hf_cfg._attn_implementation = "sdpa"
        self.module = LlamaForCausalLM(hf_cfg)

    def logits(self, input_ids):
        return self.module(input_ids=input_ids, use_cache=False).logits

    def hf_state_dict(self) -> dict:
        sd = dict(self.module.state_dict())
        if self.module.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_hf_state(self, state: dict) -> None:
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight"
                                               and self.module.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"weight mismatch: missing {missing}, unexpected {unexpected}")


def make_backend(config: dict[str, Any], trainer: str = "auto") -> _Backend:
    if trainer not in TRAINERS:
        raise TrainError(f"trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")
    if trainer in ("auto", "engine"):
        try:
            return _EngineBackend(config)
        except ImportError:
            if trainer == "engine":
                raise
    return _TransformersBackend(config)


def count_parameters(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
