"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, per-request seeds,
top-n logprobs)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """Per-request generation settings. temperature/top_p/top_k left as None take the model's
    generation_config.json defaults (else 1.0 / 1.0 / disabled). temperature 0 is greedy."""
    max_tokens: int | None = 16  # None: until the context is full
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: disabled
    seed: int | None = None  # reproducible per request, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # cut on the detokenized text, not included
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: chosen token's logprob and the top n
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    def resolve(self, temperature=None, top_p=None, top_k=None) -> "SamplingParams":
        """Fill unset fields from model defaults (generation_config.json)."""
        return replace(
            self,
            temperature=self.temperature if self.temperature is not None else
            (temperature if temperature is not None else 1.0),
            top_p=self.top_p if self.top_p is not None else (top_p if top_p is not None else 1.0),
            top_k=self.top_k if self.top_k is not None else (top_k if top_k is not None else 0))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-n (token id, logprob), best first


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask logits [B, V] outside each row's top-k / nucleus with -inf. top_k: [B] long (V = off),
    top_p: [B] float (1.0 = off)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    V = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (V - top_k).clamp(0, V - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)


class Sampler:
    """Samples one token per row. Random rows draw exponential noise (Gumbel-max equivalent:
    argmax(p / E) with E ~ Exp(1) samples from p), from the request's own generator when seeded."""

    def __call__(self, logits: Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float()
        B, V = logits.shape
        dev = logits.device

        def tensor(data, dtype=None):  # pinned + async on CUDA: no hidden stream sync
            pin = dev.type == "cuda"
            return torch.tensor(data, dtype=dtype, pin_memory=pin).to(dev, non_blocking=pin)

        greedy_ids = logits.argmax(dim=-1)
        ids = greedy_ids
        if any(p.temperature > 0 for p in params):
            temps = tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32)
            x = logits / temps.unsqueeze(1)
            ks = [p.top_k if p.top_k and p.top_k > 0 else V for p in params]
            ps = [p.top_p for p in params]
            if any(k < V for k in ks) or any(p < 1.0 for p in ps):
                x = apply_top_k_top_p(
                    x, tensor(ks, torch.long) if any(k < V for k in ks) else None,
                    tensor(ps, torch.float32) if any(p < 1.0 for p in ps) else None)
            probs = x.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for i, g in enumerate(generators):
                if g is not None and params[i].temperature > 0:
                    noise[i].exponential_(generator=g)
            sampled = (probs / noise).argmax(dim=-1)
            is_greedy = tensor([p.temperature == 0 for p in params], torch.bool)
            ids = torch.where(is_greedy, greedy_ids, sampled)
        want = [p.logprobs for p in params]
        n_top = max((n for n in want if n is not None), default=None)
        if n_top is None:
            return ids.tolist(), [None] * B
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
        top_v, top_i = logp.topk(min(n_top, V), dim=-1) if n_top else (None, None)
        ids_l, chosen_l = ids.tolist(), chosen.tolist()
        top_v_l = top_v.tolist() if n_top else None
        top_i_l = top_i.tolist() if n_top else None
        out: list[TokenLogprob | None] = []
        for i, n in enumerate(want):
            if n is None:
                out.append(None)
                continue
            top = list(zip(top_i_l[i][:n], top_v_l[i][:n])) if n else []
            out.append(TokenLogprob(ids_l[i], chosen_l[i], top))
        return ids_l, out
