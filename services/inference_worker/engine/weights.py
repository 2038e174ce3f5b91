"""Where each of our parameters comes from in a Hugging Face checkpoint, per family.

Each of our parameters is the concatenation (along dim 0 of its 2-D view) of the listed tensors: q/k/v
into qkv, gate/up into gate_up, and every expert's tensors into the stacked expert weights."""
from __future__ import annotations

from .config import ModelConfig

# family -> (names of the MoE block and its router, each expert's gate, up and down projections)
_MOE = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}
# our norm -> the HF norm, by where a family puts its norms (see model.Block)
_NORMS = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "mlp_norm": "pre_feedforward_layernorm",
                 "post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}


def hf_weight_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face tensors concatenated to form it."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    fused = cfg.family == "phi3"  # Phi-3 ships qkv_proj and gate_up_proj already fused
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for our_norm, hf_norm in _NORMS[cfg.norms].items():
            names[ours + our_norm] = [hf + hf_norm + ".weight"]
        attn = hf + "self_attn."
        names[ours + "attn.qkv.weight"] = [attn + "qkv_proj.weight"] if fused else [
            attn + f"{p}_proj.weight" for p in "qkv"]
        names[ours + "attn.o.weight"] = [attn + "o_proj.weight"]
        if cfg.qk_norm:
            names[ours + "attn.q_norm"] = [attn + "q_norm.weight"]
            names[ours + "attn.k_norm"] = [attn + "k_norm.weight"]
        if cfg.qkv_bias:
            names[ours + "attn.qkv.bias"] = [attn + f"{p}_proj.bias" for p in "qkv"]
        if cfg.o_bias:
            names[ours + "attn.o.bias"] = [attn + "o_proj.bias"]
        if cfg.moe_layers and cfg.moe_layers[i]:
            block, router, (gate, up, down) = _MOE[cfg.family]
            experts = [f"{hf}{block}.experts.{e}." for e in range(cfg.num_experts)]
            names[ours + "mlp.router.weight"] = [f"{hf}{block}.{router}.weight"]
            names[ours + "mlp.gate_up"] = [x + f"{p}.weight" for x in experts for p in (gate, up)]
            names[ours + "mlp.down"] = [x + f"{down}.weight" for x in experts]
            continue
        mlp = hf + "mlp."
        names[ours + "mlp.gate_up.weight"] = [mlp + "gate_up_proj.weight"] if fused else [
            mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        names[ours + "mlp.down.weight"] = [mlp + "down_proj.weight"]
        if cfg.mlp_bias:
            names[ours + "mlp.gate_up.bias"] = [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
            names[ours + "mlp.down.bias"] = [mlp + "down_proj.bias"]
    return names


def split_rows(ours: str, cfg: ModelConfig, rows: int, n_sources: int) -> list[int]:
    """How many rows (of the parameter's 2-D view) each source tensor fills."""
    if ".qkv." in ours and n_sources == 3:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    return [rows // n_sources] * n_sources


def is_norm(ours: str) -> bool:
    return ours == "norm" or ours.endswith("_norm")
