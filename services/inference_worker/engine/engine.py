"""LLMEngine: requests in, streamed tokens out.

``add_request`` and ``cancel`` may be called from any thread; they only queue work under a lock,
and ``step()`` (one thread) drains that queue, schedules, runs the model once and streams.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import torch

from .block_manager import BlockManager, CacheUsage, freeing_window
from .config import EngineConfig
from .cpu_linear import model_bytes
from .embedding import (POOLINGS, EmbeddingCancelled, EmbeddingJob, EmbeddingOutput, PagedCache, checkpoint_pooling,
                        run_slice)
from .errors import ContextLengthError, InvalidRequestError
from .guided import Constraint, Guide
from .loader import Checkpoint, load_checkpoint
from .model_runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Callback, RequestOutput, Sequence
from .tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None):
        self.ckpt, self.ecfg = checkpoint, config or EngineConfig()
        self.model_config, self.tokenizer = checkpoint.config, checkpoint.tokenizer
        self.generation = checkpoint.generation
        cfg, model = self.model_config, checkpoint.model
        max_len = self.ecfg.max_model_len or cfg.max_position_embeddings
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        self.runner = ModelRunner(model, cfg, self.ecfg, max_len)
        self.block_manager = BlockManager(self.runner.num_blocks, self.ecfg.block_size,
                                          self.runner.bytes_per_block, freeing_window(cfg.layer_windows))
        long_from = cfg.rope.long_from
        self.scheduler = Scheduler(self.block_manager, self.ecfg.max_num_seqs,
                                   self.ecfg.max_num_batched_tokens,
                                   None if long_from is None else long_from + 1)
        # A sequence must fit what it reserves on admission in the whole cache. A windowed one
        # reserves about a window's worth, so it may grow far longer than the cache.
        if self.block_manager.blocks_for(self.scheduler.reserve_tokens(max_len)) > self.runner.num_blocks:
            max_len = min(max_len, self.runner.num_blocks * self.ecfg.block_size)
        self.max_model_len = max_len
        if model.max_seq_len < self.max_model_len:
            model.init_rope(self.max_model_len)
        self.eos_ids = set(self.generation.eos_token_ids)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # signalled when a request arrives
        self._incoming: list[Sequence] = []
        self._cancels: set[str] = set()
        self._live: set[str] = set()  # request ids added and not yet finished
        self._seqs: dict[str, Sequence] = {}  # scheduled (waiting or running) sequences
        self._ids = itertools.count()
        self._guide: Guide | None = None  # built on the first constrained request
        self._embeddings: list[EmbeddingJob] = []  # queued by submit_embedding, run a slice per step
        self.pooling = checkpoint_pooling(checkpoint.path)  # a deployment may override it
        log.info("engine ready: %s on %s/%s, %d KV blocks x %d tokens (%.1f MiB), max_model_len %d",
                 cfg.architecture, self.device, self.dtype, self.runner.num_blocks,
                 self.ecfg.block_size, self.cache_usage().total_bytes / 2**20, self.max_model_len)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **kwargs) -> "LLMEngine":
        """Load a checkpoint directory. kwargs are EngineConfig fields (device, dtype, num_blocks...)."""
        ecfg = config or EngineConfig(**kwargs)
        device = ecfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ecfg = dataclasses.replace(ecfg, device=device)
        return cls(load_checkpoint(path, device=device, dtype=ecfg.dtype,
                                   max_seq_len=ecfg.max_model_len, quantize=ecfg.quantize), ecfg)

    # ---- properties the worker reports -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    can_embed = True

    def close(self) -> None:
        """Nothing to free by hand: the tensors go with the engine."""

    @property
    def can_generate(self) -> bool:
        """False for an embedding checkpoint saved without its LM head."""
        return self.ckpt.model.can_generate

    @property
    def weights_bytes(self) -> int:
        return model_bytes(self.ckpt.model)

    def cache_usage(self) -> CacheUsage:
        return self.block_manager.usage()

    def stats(self) -> dict:
        u = self.cache_usage()
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "num_preemptions": self.scheduler.num_preemptions, "kv_cache_usage": u.usage,
                "kv_blocks_used": u.used_blocks, "kv_blocks_total": u.num_blocks}

    def default_sampling_params(self, **overrides) -> SamplingParams:
        g = self.generation
        return SamplingParams(**overrides).resolve(g.temperature, g.top_p, g.top_k)

    # ---- requests (thread-safe) --------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                    *, messages: list[dict] | None = None, request_id: str | None = None,
                    callback: Callback | None = None, reject_invalid: bool = False,
                    cap_max_tokens: bool = True, tools: list[dict] | None = None) -> str:
        """Queue a request: a text prompt, token ids, or chat ``messages`` (rendered with the
        checkpoint's chat template). Returns its id. An invalid request (empty, too long, unknown
        token ids, a constraint whose grammar cannot compile: GrammarError) finishes at the next step with
        finish_reason "error" and a message; with
        ``reject_invalid`` it raises InvalidRequestError (ContextLengthError for a prompt over the
        context) here instead, before anything is queued. ``cap_max_tokens`` False makes a prompt plus
        ``max_tokens`` over max_model_len invalid too; True (the default) lets the context cut it. ``tools``
        (OpenAI's tool definitions) go to the chat template with ``messages``."""
        params = (params or SamplingParams()).resolve(
            self.generation.temperature, self.generation.top_p, self.generation.top_k
        )
        vocab = self.model_config.vocab_size
        bad_bias = sorted(t for t in (params.logit_bias or {}) if t >= vocab)
        if bad_bias:
            raise ValueError(f"logit_bias names token ids outside the vocabulary (size {vocab}): {bad_bias[:5]}")
        if messages is not None:
            ids = self.tokenizer.encode_chat(messages, tools=tools)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt is not None:
            ids = [int(t) for t in prompt]
        else:
            raise ValueError("give a prompt (text or token ids) or messages")
        matcher = grammar_error = None
        if params.constraint is not None:
            try:
                matcher = self.compile(params.constraint)
            except InvalidRequestError as e:
                grammar_error = e
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = (
            IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            if self.tokenizer is not None
            else None
        )
        with self._lock:
            rid = request_id
            while rid is None or (request_id is None and rid in self._live):
                rid = f"req-{next(self._ids)}"
            if rid in self._live:
                raise ValueError(f"request id {rid!r} is already in use")
            error = self._validate(ids, None if cap_max_tokens else params.max_tokens) or grammar_error
            if error is not None and reject_invalid:
                raise error
            seq = Sequence(rid, ids, params, self.eos_ids, detok, callback, generator, matcher)
            if error is not None:
                seq.finish("error", error=str(error), flush=False)
            self._live.add(rid)
            self._incoming.append(seq)
            self._work.notify_all()
        return rid

    def compile(self, constraint: Constraint):
        """A fresh matcher for the constraint, compiled once and cached; GrammarError (an InvalidRequestError)
        when it cannot compile. A server calls this off its event loop first: compiling a large schema
        takes 100 ms and more, and add_request then finds it cached."""
        if self.tokenizer is None:
            raise InvalidRequestError("constrained decoding needs the checkpoint's tokenizer")
        with self._lock:
            if self._guide is None:
                self._guide = Guide(self.tokenizer.to_json(), self.model_config.vocab_size, sorted(self.eos_ids))
        return self._guide.matcher(constraint)

    def _validate(self, ids: list[int], max_tokens: int | None) -> InvalidRequestError | None:
        """Why the request cannot run, or None; ``max_tokens`` (None: not checked) must fit after the prompt."""
        if not ids:
            return InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_model_len or (max_tokens is not None and len(ids) + max_tokens > self.max_model_len):
            cap = self.cache_usage().token_capacity
            wanted = "one generated token" if max_tokens is None else f"max_tokens {max_tokens}"
            return ContextLengthError(
                f"the prompt has {len(ids)} tokens; with {wanted} it does not fit this engine's max_model_len "
                f"{self.max_model_len} (at most {self.max_model_len - 1} prompt tokens plus one generated token; "
                f"KV cache holds {cap} tokens)",
                max_model_len=self.max_model_len,
                prompt_tokens=len(ids),
                completion_tokens=max_tokens or 1,
            )
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            return InvalidRequestError(
                f"token ids outside the vocabulary (size {self.model_config.vocab_size}): {bad[:5]}"
            )
        return None

    def cancel(self, request_id: str) -> bool:
        """Cancel a request at any time; its blocks are freed at the start of the next step and its
        callback gets a final event with finish_reason "cancelled". False if it is not live."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._cancels.add(request_id)
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block the stepping thread until some request is unfinished (or timeout); returns
        has_unfinished(). Lets a worker loop sleep instead of spinning on an idle engine."""
        with self._work:
            return self._work.wait_for(lambda: bool(self._live or self._embeddings), timeout)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit new requests, apply cancellations, run one batched forward pass, sample, stream
        the new tokens to the callbacks. Returns the requests that finished in this step."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
        touched: dict[str, Sequence] = {}
        for seq in incoming:
            if seq.finished:  # invalid request
                touched[seq.request_id] = seq
            else:
                self._seqs[seq.request_id] = seq
                self.scheduler.add(seq)
        for rid in cancels:
            seq = self._seqs.get(rid)
            if seq is not None and not seq.finished:
                self.scheduler.remove(seq)
                seq.finish("cancelled")
                touched[rid] = seq
        batch = self.scheduler.schedule()
        if batch:
            try:
                results = self.runner.run(batch)
            except Exception as e:  # never take the whole engine down with one bad batch
                log.exception("model step failed; failing %d requests", len(batch))
                results = []
                for s in batch:
                    s.seq.finish("error", error=f"model step failed: {type(e).__name__}: {e}")
                    touched[s.seq.request_id] = s.seq
            else:
                for s in batch:
                    s.seq.num_computed += s.num_tokens
                for seq, token_id, logprob in results:
                    seq.append(token_id, logprob, self.max_model_len)
                    touched[seq.request_id] = seq
        self._embedding_step()
        outputs = []
        for rid, seq in touched.items():
            if seq.finished:  # free first, so a callback already sees the blocks released
                if seq.matcher is not None and seq.matcher.is_error() and self._guide is not None:
                    self._guide.forget(seq.params.constraint)
                if rid in self._seqs:
                    self.scheduler.remove(seq)
                    del self._seqs[rid]
                with self._lock:
                    self._live.discard(rid)
                outputs.append(seq.output())
            seq.stream()
        return outputs

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (texts or token-id lists; a single one is accepted too) to completion."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        pending, done = set(ids), {}
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
        return [done[i] for i in ids]

    # ---- embeddings (see embedding.py) -----------------------------------------------------------
    def submit_embedding(self, inputs: list[str | list[int]], pooling: str | None = None) -> Future[EmbeddingOutput]:
        """Queue texts or token-id lists to embed (any thread); the future resolves on the stepping
        thread. Raises InvalidRequestError (ContextLengthError: an input over max_model_len) before
        anything is queued."""
        how = pooling or self.pooling
        if how not in POOLINGS:
            raise InvalidRequestError(
                f"this model pools with {how!r}, which the engine does not implement "
                f"(it implements {', '.join(POOLINGS)})"
            )
        if not inputs:
            raise InvalidRequestError("there is nothing to embed")
        if self.tokenizer is None and any(isinstance(x, str) for x in inputs):
            raise InvalidRequestError("this model has no tokenizer: send token ids")
        prompts = [self.tokenizer.encode(x) if isinstance(x, str) else [int(t) for t in x] for x in inputs]
        for i, ids in enumerate(prompts):
            if (error := self._validate_embedding(i, ids)) is not None:
                raise error
        job = EmbeddingJob(prompts, how)
        with self._lock:
            self._embeddings.append(job)
            self._work.notify_all()
        return job.future

    def _validate_embedding(self, i: int, ids: list[int]) -> InvalidRequestError | None:
        """Why input ``i`` cannot be embedded, or None. It may fill the whole context: no token is generated
        after it."""
        if not ids:
            return InvalidRequestError(f"input {i} is empty (no tokens)")
        if len(ids) > self.max_model_len:
            return ContextLengthError(
                f"input {i} has {len(ids)} tokens, over this engine's max_model_len {self.max_model_len}",
                max_model_len=self.max_model_len,
                prompt_tokens=len(ids),
                completion_tokens=0,
            )
        vocab = self.model_config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            return InvalidRequestError(f"input {i} has token ids outside the vocabulary (size {vocab}): {bad[:5]}")
        return None

    def _embedding_step(self) -> None:
        with self._lock:
            job = self._embeddings[0] if self._embeddings else None
        cache = PagedCache(self.runner.kv_cache, self.block_manager)
        if job is not None and run_slice(self.ckpt.model, job, self.ecfg.max_num_batched_tokens, cache):
            with self._lock:
                if job in self._embeddings:  # fail_embeddings may have emptied the queue meanwhile
                    self._embeddings.remove(job)

    def cancel_embedding(self, future: Future[EmbeddingOutput], reason: str = "cancelled") -> bool:
        """Stop a queued or running embedding job (any thread): its future fails with EmbeddingCancelled
        at the next step (or is cancelled at once if it has not started). False if it is not queued."""
        with self._lock:
            job = next((j for j in self._embeddings if j.future is future), None)
            if job is None:
                return False
            job.cancelled = reason
            self._work.notify_all()
        future.cancel()
        return True

    def fail_embeddings(self, reason: str) -> None:
        """Fail every queued embedding job, for an engine that will step no more (the loop stopped)."""
        with self._lock:
            jobs, self._embeddings = self._embeddings, []
        for job in jobs:
            try:
                job.future.set_exception(EmbeddingCancelled(reason))  # pending or running alike: it says why
            except InvalidStateError:  # cancelled by its caller, or the last step finished it
                pass

    def embed(self, inputs: list[str | list[int]], pooling: str | None = None) -> EmbeddingOutput:
        """Embed and wait, stepping the engine here (as ``generate``: only where no other thread steps it)."""
        future = self.submit_embedding(inputs, pooling)
        while not future.done():
            self.step()
        return future.result()
