"""One decoder for every supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, Granite,
Mixtral, Qwen3-MoE), reading and writing a paged KV cache. The families differ only by ModelConfig
flags: norm placement, q/k norms, activation, scales, soft-caps, sliding windows, experts.

One forward pass takes a flat batch of tokens from many sequences (nano-vllm style): the first
``num_decode`` tokens are single-token decode steps that attend over the paged cache, the rest are
prefill chunks that attend causally. q/k/v and gate/up are fused linears.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import paged_decode_attention, rms_norm, rms_norm_residual, rope, swiglu
from .compiled_decode import DecodeOnly, attend_appended
from .config import ModelConfig
from .moe import MoE


@dataclass
class PrefillChunk:
    start: int  # token range [start, end) in the flat batch
    end: int
    cached: int = 0  # tokens of this sequence already in the KV cache before this chunk
    block_table: Tensor | None = None  # [n_blocks] int64, needed only when cached > 0
    seq_len: int = 0  # tokens the sequence has so far (>= cached + this chunk): picks longrope's set


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor | None  # [T] int64 cache slot of each token; None: run without a cache
    num_decode: int = 0
    block_tables: Tensor | None = None  # [num_decode, max_blocks] int32
    context_lens: Tensor | None = None  # [num_decode] int32, including the current token
    prefills: list[PrefillChunk] = field(default_factory=list)


def _norm_weight(size: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(size))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale, self.softcap, self.window, self.eps = cfg.scale, cfg.attn_softcap, window, cfg.rms_norm_eps
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            full = cfg.qk_norm == "full"
            self.q_norm = _norm_weight(self.q_size if full else self.head_dim)
            self.k_norm = _norm_weight(self.kv_size if full else self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor | None,
                meta: AttentionMetadata | DecodeOnly) -> Tensor:
        T = x.shape[0]
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm is None:  # q and k side by side in qkv: one RoPE call rotates both heads' sets
            qk = _rope(qkv[:, :self.q_size + self.kv_size].view(T, self.n_heads + self.n_kv, self.head_dim), cos, sin)
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        else:
            if self.qk_norm == "full":  # OLMo 2: over the whole projection, before the heads split
                q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
            q, k = q.reshape(T, self.n_heads, self.head_dim), k.reshape(T, self.n_kv, self.head_dim)
            if self.qk_norm == "head":
                q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        v = v.reshape(T, self.n_kv, self.head_dim)
        if isinstance(meta, DecodeOnly):  # the compiled decode step: the cache is written after it
            meta.new_kv += (k, v)
            out = attend_appended(q, k, v, kv, meta.plans[self.window], self.scale, self.softcap)
            return self.o(out.reshape(T, self.q_size))
        if kv is not None:  # kv: [2, num_blocks, block_size, n_kv, head_dim]
            kv[0].view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, k)
            kv[1].view(-1, self.n_kv, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], kv[0], kv[1], meta.block_tables, meta.context_lens,
                                              self.scale, window=self.window, softcap=self.softcap)
        for p in meta.prefills:
            out[p.start:p.end] = self._prefill(q[p.start:p.end], k[p.start:p.end],
                                               v[p.start:p.end], kv, p)
        return self.o(out.view(T, self.q_size))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: Tensor | None, p: PrefillChunk) -> Tensor:
        n = p.cached + q.shape[0]
        if p.cached:  # a later chunk of a long prompt: attend to the cached prefix too
            k = kv[0][p.block_table].flatten(0, 1)[:n]
            v = kv[1][p.block_table].flatten(0, 1)[:n]
        plain = not p.cached and self.window is None and self.softcap is None
        mask = None if plain else _causal_mask(p.cached, n, self.window, q.device)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        group = self.n_heads // self.n_kv
        if self.softcap is not None:  # SDPA cannot cap scores: the plain math, in fp32
            k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
            scores = (q.float() @ k.transpose(-1, -2)) * self.scale
            scores = (torch.tanh(scores / self.softcap) * self.softcap).masked_fill(~mask, float("-inf"))
            o = (scores.softmax(-1) @ v).to(q.dtype)
        else:
            gqa = group > 1
            if mask is not None and gqa:  # masked SDPA with GQA falls back to the O(n^2)-memory math kernel
                k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain,
                                               scale=self.scale, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)


def _causal_mask(cached: int, n: int, window: int | None, device: torch.device) -> Tensor:
    """[n - cached, n]: query at position i sees key j when j <= i and, with a window, i - j < window."""
    q_pos = torch.arange(cached, n, device=device)[:, None]
    k_pos = torch.arange(n, device=device)[None, :]
    mask = k_pos <= q_pos
    return mask if window is None else mask & (q_pos - k_pos < window)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    dim = 2 * cos.shape[-1]
    if dim == x.shape[-1]:
        return rope(x, cos, sin)
    return torch.cat((rope(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)  # partial rotary (Phi-4-mini)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(swiglu(self.gate_up(x), self.act))


class Block(nn.Module):
    """Pre-norm (Llama), sandwich (Gemma: norms before and after attention and MLP) or post-norm
    (OLMo 2). A block returns its output and the residual stream it has not yet been added to, so the
    add fuses with the next norm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.eps, self.norms, self.scale = cfg.rms_norm_eps, cfg.norms, cfg.residual_scale
        self.attn = Attention(cfg, cfg.layer_windows[layer] if cfg.layer_windows else None)
        self.mlp = MoE(cfg) if cfg.moe_layers and cfg.moe_layers[layer] else MLP(cfg)
        self.local_rope = cfg.local_rope is not None and self.attn.window is not None
        if cfg.norms != "post":
            self.attn_norm, self.mlp_norm = _norm_weight(cfg.hidden_size), _norm_weight(cfg.hidden_size)
        if cfg.norms != "pre":
            self.post_attn_norm, self.post_mlp_norm = _norm_weight(cfg.hidden_size), _norm_weight(cfg.hidden_size)

    def forward(self, x, residual, cos, sin, kv, meta):
        h, residual = self._add_norm(x, residual, "attn_norm")
        x = self._post(self.attn(h, cos, sin, kv, meta), "post_attn_norm")
        h, residual = self._add_norm(x, residual, "mlp_norm")
        return self._post(self.mlp(h), "post_mlp_norm"), residual

    def _add_norm(self, x: Tensor, residual: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        if self.norms == "post":  # no norm before: the sublayer reads the residual stream itself
            residual = x if residual is None else x + residual
            return residual, residual
        if residual is None:
            return rms_norm(x, getattr(self, name), self.eps), x
        return rms_norm_residual(x, residual, getattr(self, name), self.eps)

    def _post(self, x: Tensor, name: str) -> Tensor:
        if self.norms != "pre":
            x = rms_norm(x, getattr(self, name), self.eps)
        return x * self.scale if self.scale != 1.0 else x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = _norm_weight(cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = 0
        self.can_generate = True  # False: an embedding checkpoint without its LM head (loader.py)

    def init_rope(self, max_seq_len: int) -> None:
        """Precompute cos/sin [rows, rotary_dim // 2] in fp32 on the model's device (a second set for
        Gemma 3's local layers; longrope stacks short and long rows)."""
        device = self.norm.device
        for prefix, spec in (("rope", self.cfg.rope), ("local_rope", self.cfg.local_rope)):
            if spec is not None:
                cos, sin = spec.tables(max_seq_len, device)
                self.register_buffer(f"{prefix}_cos", cos, persistent=False)
                self.register_buffer(f"{prefix}_sin", sin, persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_cache: Tensor | None = None) -> Tensor:
        """input_ids, positions: [T]. kv_cache: [num_layers, 2, num_blocks, block_size, n_kv, D].
        Returns the final-normed hidden states [T, hidden]."""
        rows = self._rope_rows(positions, meta)
        cos, sin = self.rope_cos[rows], self.rope_sin[rows]
        local = (self.local_rope_cos[positions], self.local_rope_sin[positions]) if self.cfg.local_rope else None
        x, residual = self.embed(input_ids), None
        if self.cfg.embed_scale != 1.0:  # rounded to the model dtype first, as transformers does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            c, s = local if layer.local_rope else (cos, sin)
            x, residual = layer(x, residual, c, s, None if kv_cache is None else kv_cache[i], meta)
        return rms_norm_residual(x, residual, self.norm, self.cfg.rms_norm_eps)[0]

    def _rope_rows(self, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """Rows of the RoPE table. longrope (Phi-3): as transformers, a sequence longer than
        original_max_position_embeddings uses the long factors for all its tokens (the scheduler
        re-encodes the cache of one that grows past it, see Scheduler.reencode_at)."""
        long_from = self.cfg.rope.long_from
        if long_from is None:
            return positions
        seq_len = positions + 1
        for p in meta.prefills:
            seq_len[p.start:p.end] = max(p.cached + p.end - p.start, p.seq_len)
        return positions + self.max_seq_len * (seq_len > long_from)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        head = F.linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)
        logits = head.float()
        if self.cfg.logits_scale != 1.0:
            logits = logits / self.cfg.logits_scale
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    @torch.inference_mode()
    def logits_without_cache(self, token_ids: Tensor) -> Tensor:
        """Logits [T, vocab] of one sequence from a plain causal forward pass (no KV cache)."""
        T = token_ids.shape[0]
        meta = AttentionMetadata(slot_mapping=None, prefills=[PrefillChunk(0, T)])
        positions = torch.arange(T, device=token_ids.device)
        return self.compute_logits(self(token_ids, positions, meta))
