"""A routed mixture of experts (Mixtral, Qwen3-MoE): a softmax router picks each token's top-k experts,
and each expert runs once over all the tokens routed to it (grouped by expert, not a loop over tokens)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..kernels import swiglu
from .config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.renormalize, self.act = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.hidden_act
        self.round_weights = cfg.router_weights_in_model_dtype
        self.router = nn.Linear(hidden, E, bias=False)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * inter, hidden))  # per expert: gate then up rows
        self.down = nn.Parameter(torch.empty(E, hidden, inter))

    def forward(self, x: Tensor) -> Tensor:
        weights, experts = self.route(x)
        flat = experts.flatten()  # [T * k]: token t's choices sit at t*k .. t*k+k-1
        order = flat.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()
        rows = x[token]
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = swiglu(F.linear(rows[start:start + n], self.gate_up[e]), self.act)
                out[start:start + n] = F.linear(h, self.down[e])
                start += n
        # rounded to the model dtype or kept fp32 until the sum, as each family does in transformers
        weighted = (out * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, weighted)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's top-k routing weights and expert ids, [T, k] each."""
        probs = self.router(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights.to(x.dtype) if self.round_weights else weights), experts
