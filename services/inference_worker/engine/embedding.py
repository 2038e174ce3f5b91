"""Embeddings: the final-norm hidden states of whole prompts, pooled (last token or mean) and
L2-normalised.

A prompt to embed runs as one causal prefill *without* the paged KV cache (``slot_mapping`` None):
it reads and writes no block, so the sequences generating in the same engine are untouched and
nothing has to be freed afterwards. The forward pass still runs on the engine thread, inside
``LLMEngine.step()``: an ``EmbeddingJob`` is queued by ``LLMEngine.submit_embedding`` (any thread)
and each step runs the next slice of it (at most ``max_num_batched_tokens`` tokens, and at least one
prompt), so a batch of 2048 inputs shares the engine with running generations instead of stalling them.

One prompt longer than ``max_num_batched_tokens`` would need more activation memory than the engine
measured when it sized its KV cache (on a GPU: an out-of-memory). It is prefilled in chunks of that
size instead, through blocks of the paged cache taken from the free list and given back within the same
step (``embed_in_chunks``): the scheduler never sees them. Without enough free blocks it runs in one piece.

Pooling, as sentence-transformers does it: "last" takes the hidden state of each prompt's last token
(Qwen3-Embedding and other decoder embedders, whose tokenizer appends an end token for it); "mean"
averages over the prompt's tokens. The batch is flat, prompts laid end to end, so there is no
padding and no left/right padding question: each prompt's last token is at its own end offset.
"""
from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_manager import BlockManager
from .model import AttentionMetadata, PrefillChunk, Transformer

log = logging.getLogger(__name__)

Pooling = Literal["last", "mean"]
POOLINGS: tuple[str, ...] = ("last", "mean")
# sentence-transformers' 1_Pooling/config.json flags -> ours; any other mode is refused, not guessed
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
_ST_POOLING_MODULE = "sentence_transformers.models.Pooling"


class EmbeddingCancelled(Exception):
    """An embedding job stopped before its end (``LLMEngine.cancel_embedding``)."""


@dataclass
class EmbeddingOutput:
    vectors: Tensor  # [inputs, hidden] float32 on the CPU, each of L2 norm 1
    prompt_tokens: list[int]  # per input
    pooling: str


@dataclass
class EmbeddingJob:
    """One request's prompts, computed a slice per engine step; its future gets an EmbeddingOutput."""

    prompts: list[list[int]]
    pooling: str
    future: Future = field(default_factory=Future)
    done: int = 0  # prompts computed so far
    parts: list[Tensor] = field(default_factory=list)
    cancelled: str | None = None  # why the rest is not to be computed (its caller went away, the engine stops)

    def next_slice(self, max_tokens: int) -> list[list[int]]:
        """The next prompts whose tokens fit ``max_tokens`` (one at least, whatever its length)."""
        end, tokens = self.done, 0
        while end < len(self.prompts) and (end == self.done or tokens + len(self.prompts[end]) <= max_tokens):
            tokens += len(self.prompts[end])
            end += 1
        return self.prompts[self.done:end]

    def output(self) -> EmbeddingOutput:
        return EmbeddingOutput(torch.cat(self.parts), [len(p) for p in self.prompts], self.pooling)


def pool(hidden: Tensor, lengths: list[int], how: str) -> Tensor:
    """[T, H] hidden states of prompts laid end to end -> [len(lengths), H] pooled, in float32."""
    lens = torch.tensor(lengths, device=hidden.device)
    if how == "last":
        return hidden[torch.cumsum(lens, 0) - 1].float()
    if how == "mean":
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lens)
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, seg, hidden.float()) / lens[:, None]
    raise ValueError(f"unknown pooling {how!r}; this engine pools with one of {', '.join(POOLINGS)}")


def normalize(vectors: Tensor) -> Tensor:
    return F.normalize(vectors.float(), p=2.0, dim=-1)


def truncate(vectors: Tensor, dimensions: int) -> Tensor:
    """Matryoshka: the first ``dimensions`` components, renormalised (what OpenAI's ``dimensions`` does)."""
    if not 1 <= dimensions <= vectors.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and the model's {vectors.shape[-1]}")
    return normalize(vectors[..., :dimensions])


@torch.inference_mode()
def embed_forward(model: Transformer, prompts: list[list[int]], how: str) -> Tensor:
    """Pooled, normalised embeddings [len(prompts), H] on the CPU from one cache-free forward pass."""
    device = model.norm.device
    chunks, start = [], 0
    for p in prompts:
        chunks.append(PrefillChunk(start, start + len(p), seq_len=len(p)))
        start += len(p)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long, device=device)
    hidden = model(ids, positions, AttentionMetadata(slot_mapping=None, prefills=chunks))
    return normalize(pool(hidden, [len(p) for p in prompts], how)).cpu()


@dataclass
class _Blocks:
    """What BlockManager.ensure/free read and write of a sequence: an embedding's borrowed blocks."""

    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0


@dataclass
class PagedCache:
    kv: Tensor  # ModelRunner.kv_cache
    blocks: BlockManager


@torch.inference_mode()
def embed_in_chunks(model: Transformer, cache: PagedCache, prompt: list[int], how: str, chunk: int) -> Tensor | None:
    """One prompt's pooled, normalised embedding [1, H], prefilled ``chunk`` tokens at a time into
    blocks borrowed from the cache and freed before returning; None when too few blocks are free."""
    borrowed, bs = _Blocks(), cache.blocks.block_size
    if not cache.blocks.ensure(borrowed, len(prompt)):
        return None
    try:
        device = model.norm.device
        table = torch.tensor(borrowed.block_table, dtype=torch.long, device=device)
        pooled = torch.zeros(model.cfg.hidden_size, dtype=torch.float32, device=device)
        for start in range(0, len(prompt), chunk):
            end = min(start + chunk, len(prompt))
            positions = torch.arange(start, end, device=device)
            meta = AttentionMetadata(slot_mapping=table[positions // bs] * bs + positions % bs, prefills=[PrefillChunk(
                0, end - start, start, table[:-(-end // bs)] if start else None, len(prompt))])
            hidden = model(torch.tensor(prompt[start:end], dtype=torch.long, device=device), positions, meta, cache.kv)
            pooled = pooled + hidden.float().sum(0) if how == "mean" else hidden[-1].float()
        return normalize((pooled / len(prompt) if how == "mean" else pooled)[None]).cpu()
    finally:
        cache.blocks.free(borrowed)


def run_slice(model: Transformer, job: EmbeddingJob, max_tokens: int, cache: PagedCache | None = None) -> bool:
    """Compute the job's next slice (on the engine thread); True when the job is over (its future
    resolved, with the vectors or with the exception the forward pass raised)."""
    if job.future.done():  # failed from another thread (LLMEngine.fail_embeddings)
        return True
    if job.done == 0 and not job.future.set_running_or_notify_cancel():
        return True  # the caller gave up before it started
    if job.cancelled is not None:  # a running future cannot be cancelled: it fails with the reason
        return _resolve(job, exc=EmbeddingCancelled(job.cancelled))
    prompts = job.next_slice(max_tokens)
    try:
        long = len(prompts[0]) > max_tokens and cache is not None  # a slice of one prompt, then
        chunked = embed_in_chunks(model, cache, prompts[0], job.pooling, max_tokens) if long else None  # type: ignore[arg-type]
        job.parts.append(chunked if chunked is not None else embed_forward(model, prompts, job.pooling))
    except Exception as exc:  # one bad job must not take the engine thread down
        log.exception("embedding forward pass failed")
        return _resolve(job, exc=exc)
    job.done += len(prompts)
    return _resolve(job) if job.done == len(job.prompts) else False


def _resolve(job: EmbeddingJob, exc: BaseException | None = None) -> bool:
    """Settle the job's future, unless fail_embeddings (another thread) did it first."""
    with contextlib.suppress(InvalidStateError):
        if exc is None:
            job.future.set_result(job.output())
        else:
            job.future.set_exception(exc)
    return True


def checkpoint_pooling(path: str | Path) -> str:
    """The pooling a checkpoint declares through sentence-transformers (``modules.json`` naming a
    Pooling module, whose ``config.json`` sets one ``pooling_mode_*``), else "last": a decoder LLM's
    last token is the one that has seen the whole prompt. A mode this engine lacks (cls, max...) is
    returned as its sentence-transformers name, and embedding requests are refused with it."""
    path = Path(path)
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return "last"
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and module.get("type") == _ST_POOLING_MODULE:
            try:
                config = json.loads((path / str(module.get("path", "")) / "config.json").read_text())
            except (OSError, ValueError):
                log.warning(
                    "%s: modules.json names a Pooling module without a readable config.json; pooling 'last'", path
                )
                return "last"
            modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
            ours = [_ST_MODES[m] for m in modes if m in _ST_MODES]
            if len(modes) == 1 and ours:
                return ours[0]
            return "+".join(modes) or "none"
    return "last"
