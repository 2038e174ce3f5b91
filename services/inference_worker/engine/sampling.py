"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, min-p, per-request
seeds, top-n logprobs; presence/frequency/repetition penalties, logit bias and grammar masks).

Every per-request parameter is a tensor over the batch; a batch where no request sets one skips it.
Order (as vLLM's sampler): logit bias, repetition penalty (over prompt + output), presence and
frequency penalties (over the output, as OpenAI documents them) on the raw logits, so greedy sees them
too; then a constrained row's grammar mask (guided.py); then temperature, top-k, top-p, min-p. Logprobs
stay those of the raw model logits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .guided import Constraint


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
    presence_penalty: float = 0.0  # OpenAI: minus this for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt and output tokens divided (>0) or multiplied (<0)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the most likely one's
    constraint: "Constraint | None" = None  # the output must match this grammar (guided.py)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()} or None
        for t, b in (self.logit_bias or {}).items():
            if t < 0 or not -100 <= b <= 100:
                raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {t}: {b}")

    def resolve(self, temperature=None, top_p=None, top_k=None) -> "SamplingParams":
        """Fill unset fields from model defaults (generation_config.json)."""
        return replace(
            self,
            temperature=self.temperature
            if self.temperature is not None
            else (temperature if temperature is not None else 1.0),
            top_p=self.top_p if self.top_p is not None else (top_p if top_p is not None else 1.0),
            top_k=self.top_k if self.top_k is not None else (top_k if top_k is not None else 0),
        )


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


def _counts(rows: list[list[int]], V: int, dev: torch.device) -> Tensor:
    """[B, V] float: how often each token id occurs in each row (one scatter, no loop over V)."""
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return torch.zeros(len(rows), V, device=dev)
    ids = torch.tensor([r + [V] * (width - len(r)) for r in rows], dtype=torch.long).to(dev)
    out = torch.zeros(len(rows), V + 1, device=dev)
    return out.scatter_add_(1, ids, torch.ones(ids.shape, device=dev))[:, :V]


def apply_penalties(logits: Tensor, params: list[SamplingParams], history: list[tuple[list[int], list[int]]]) -> Tensor:
    """Logit bias, repetition, presence and frequency penalties on logits [B, V] (float, in place).
    history: each row's (prompt ids, generated ids)."""
    B, V = logits.shape
    dev = logits.device
    if any(p.logit_bias for p in params):
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for t, b in (p.logit_bias or {}).items():
                rows.append(i), cols.append(t), vals.append(b)
        logits.index_put_(
            (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
            torch.tensor(vals, device=dev),
            accumulate=True,
        )
    if not any(p.penalized for p in params):
        return logits
    out = _counts([h[1] for h in history], V, dev)
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        seen = (out > 0) | (_counts([h[0] for h in history], V, dev) > 0)
        r = torch.tensor(rep, device=dev).unsqueeze(1)
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
    return logits - freq * out - pres * (out > 0).float()


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below min_p [B] times their row's top probability."""
    probs = logits.softmax(dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < floor, float("-inf"))


class Sampler:
    """Samples one token per row. Random rows draw exponential noise (Gumbel-max equivalent:
    argmax(p / E) with E ~ Exp(1) samples from p), from the request's own generator when seeded."""

    def __call__(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        history: list[tuple[list[int], list[int]]] | None = None,
        allowed: Tensor | None = None,
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """history: each row's (prompt ids, generated ids), needed when a row sets a penalty.
        allowed: [B, V] bool, the tokens each row's grammar permits (guided.allowed_tokens)."""
        logits = raw = logits.float()
        B, V = logits.shape
        dev = logits.device
        if any(p.penalized or p.logit_bias for p in params):
            if history is None and any(p.penalized for p in params):
                raise ValueError("penalties need each row's prompt and generated token ids")
            logits = apply_penalties(logits.clone(), params, history or [([], [])] * B)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))

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
                    x,
                    tensor(ks, torch.long) if any(k < V for k in ks) else None,
                    tensor(ps, torch.float32) if any(p < 1.0 for p in ps) else None,
                )
            if any(p.min_p > 0 for p in params):
                x = apply_min_p(x, tensor([p.min_p for p in params], torch.float32))
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
        logp = raw.log_softmax(dim=-1)
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
