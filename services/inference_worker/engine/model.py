"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM) that reads and writes a paged KV cache.

One forward pass takes a flat batch of tokens from many sequences (nano-vllm style): the first
``num_decode`` tokens are single-token decode steps that attend over the paged cache, the rest are
prefill chunks that attend causally with torch SDPA. q/k/v and gate/up are fused linears.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import paged_decode_attention, rms_norm, rms_norm_residual, rope, swiglu
from .config import ModelConfig, rope_inv_freq


@dataclass
class PrefillChunk:
    start: int  # token range [start, end) in the flat batch
    end: int
    cached: int = 0  # tokens of this sequence already in the KV cache before this chunk
    block_table: Tensor | None = None  # [n_blocks] int64, needed only when cached > 0


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor | None  # [T] int64 cache slot of each token; None: run without a cache
    num_decode: int = 0
    block_tables: Tensor | None = None  # [num_decode, max_blocks] int32
    context_lens: Tensor | None = None  # [num_decode] int32, including the current token
    prefills: list[PrefillChunk] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor | None,
                meta: AttentionMetadata) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rope(q.reshape(T, self.n_heads, self.head_dim), cos, sin)
        k = rope(k.reshape(T, self.n_kv, self.head_dim), cos, sin)
        v = v.reshape(T, self.n_kv, self.head_dim)
        if kv is not None:  # kv: [2, num_blocks, block_size, n_kv, head_dim]
            kv[0].view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, k)
            kv[1].view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], kv[0], kv[1], meta.block_tables,
                                              meta.context_lens, self.scale)
        for p in meta.prefills:
            out[p.start:p.end] = self._prefill(q[p.start:p.end], k[p.start:p.end],
                                               v[p.start:p.end], kv, p)
        return self.o(out.view(T, self.q_size))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: Tensor | None, p: PrefillChunk) -> Tensor:
        mask, gqa = None, self.n_heads != self.n_kv
        if p.cached:  # a later chunk of a long prompt: attend to the cached prefix too
            n = p.cached + q.shape[0]
            k = kv[0][p.block_table].flatten(0, 1)[:n]
            v = kv[1][p.block_table].flatten(0, 1)[:n]
            q_pos = torch.arange(p.cached, n, device=q.device)
            mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
            if gqa:  # masked SDPA with GQA would fall back to the O(n^2)-memory math kernel
                group = self.n_heads // self.n_kv
                k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
            scale=self.scale, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(swiglu(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.attn = Attention(cfg)
        self.mlp_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, kv, meta):
        if residual is None:
            h, residual = rms_norm(x, self.attn_norm, self.eps), x
        else:
            h, residual = rms_norm_residual(x, residual, self.attn_norm, self.eps)
        x = self.attn(h, cos, sin, kv, meta)
        h, residual = rms_norm_residual(x, residual, self.mlp_norm, self.eps)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = 0

    def init_rope(self, max_seq_len: int) -> None:
        """Precompute cos/sin [max_seq_len, head_dim // 2] in fp32 on the model's device."""
        device = self.norm.device
        inv_freq = rope_inv_freq(self.cfg).to(device)
        freqs = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_cache: Tensor | None = None) -> Tensor:
        """input_ids, positions: [T]. kv_cache: [num_layers, 2, num_blocks, block_size, n_kv, D].
        Returns the final-normed hidden states [T, hidden]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, None if kv_cache is None else kv_cache[i], meta)
        return rms_norm_residual(x, residual, self.norm, self.cfg.rms_norm_eps)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @torch.inference_mode()
    def logits_without_cache(self, token_ids: Tensor) -> Tensor:
        """Logits [T, vocab] of one sequence from a plain causal forward pass (no KV cache)."""
        T = token_ids.shape[0]
        meta = AttentionMetadata(slot_mapping=None, prefills=[PrefillChunk(0, T)])
        positions = torch.arange(T, device=token_ids.device)
        return self.compute_logits(self(token_ids, positions, meta))


def hf_weight_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face tensors concatenated (dim 0) to form it."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[ours + "attn_norm"] = [hf + "input_layernorm.weight"]
        names[ours + "mlp_norm"] = [hf + "post_attention_layernorm.weight"]
        names[ours + "attn.qkv.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        names[ours + "attn.o.weight"] = [hf + "self_attn.o_proj.weight"]
        names[ours + "mlp.gate_up.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        names[ours + "mlp.down.weight"] = [hf + "mlp.down_proj.weight"]
        if cfg.qkv_bias:
            names[ours + "attn.qkv.bias"] = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
        if cfg.o_bias:
            names[ours + "attn.o.bias"] = [hf + "self_attn.o_proj.bias"]
        if cfg.mlp_bias:
            names[ours + "mlp.gate_up.bias"] = [hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"]
            names[ours + "mlp.down.bias"] = [hf + "mlp.down_proj.bias"]
    return names
