"""LlamaCppEngine: a GGUF model served by llama.cpp behind the same interface as LLMEngine.

The serving layer and the engine loop call ``add_request`` (thread-safe: it only queues), ``cancel``,
``wait_for_work`` and ``step`` (one thread), and read ``tokenizer``, ``max_model_len`` and ``stats()``.
Requests are decoded together: each running request holds its own llama.cpp sequence id in one
unified KV cache, and every step is one ``llama_decode`` over a batch that carries the next token of
each decoding request plus prompt chunks of newly admitted ones (llama.cpp's own server does this; the
llama-cpp-python server runs one request at a time). What a request is and how it ends (stop strings,
max_tokens, EOS, streaming deltas, metrics) is the engine's own Sequence, and its next token is drawn
by the engine's Sampler from llama.cpp's logits, so sampling parameters, seeds and logprobs mean the
same on both runtimes.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import llama_cpp as C

from services.inference_worker.engine import GenerationDefaults, InvalidRequestError, LLMEngine, SamplingParams
from services.inference_worker.engine.sampling import Sampler
from services.inference_worker.engine.sequence import RequestOutput, Sequence
from services.inference_worker.llamacpp.vocab import tokenizer_for

log = logging.getLogger(__name__)
RUNTIME = "llama.cpp"
KV_TYPES = {"f16": (C.GGML_TYPE_F16, 2), "f32": (C.GGML_TYPE_F32, 4)}
_backend_once = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """Once per process: llama.cpp's backends, with its log routed to Python's (``_log_to_python``)."""
    global _backend_ready
    with _backend_once:
        if not _backend_ready:
            C.llama_log_set(_log_to_python, ctypes.c_void_p(0))
            C.llama_backend_init()
            _backend_ready = True


# ggml's log levels (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5). llama.cpp writes every
# tensor and graph node at load to stderr; here its lines go to the worker's log: warnings and errors
# as such, the rest at debug. (llama-cpp-python's own _logger maps an older numbering and prints INFO.)
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("llama.cpp")
_last_level = logging.DEBUG
_errors: list[str] = []  # llama.cpp's error lines, so that a failed load says why (deploy.failed's reason)


@C.llama_log_callback
def _log_to_python(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    global _last_level
    _last_level = _LEVELS.get(level, _last_level)  # CONT continues the previous line's level
    line = text.decode("utf-8", errors="replace").rstrip("\n")
    if _last_level >= logging.ERROR:
        del _errors[:-4]
        _errors.append(line)
    if _llama_log.isEnabledFor(_last_level):
        _llama_log.log(_last_level, "%s", line)


@dataclass
class _Slot:
    seq: Sequence
    seq_id: int  # llama.cpp's sequence id: the request's cells in the KV cache
    reserved: int  # KV cells booked on admission (prompt + what it may still generate)
    n_past: int = 0  # tokens whose K/V are in the cache


@dataclass
class CacheFigures:
    """What the worker reports of the KV cache (the subset of engine/block_manager.CacheUsage it reads)."""

    total_bytes: int
    token_capacity: int
    used_tokens: int

    @property
    def usage(self) -> float:
        return self.used_tokens / self.token_capacity if self.token_capacity else 0.0


def offload_params(device: str):
    """Model parameters that put every layer on ``device``. On CPU nothing is offloaded, even where
    llama.cpp was built with CUDA (its default would offload all layers)."""
    mparams = C.llama_model_default_params()
    kind, _, index = device.partition(":")
    if kind == "cpu":
        mparams.n_gpu_layers = 0
        return mparams
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"the llama.cpp runtime runs on cpu or cuda[:N]; {device!r} was asked")
    if not C.llama_supports_gpu_offload():
        raise RuntimeError(f"{device} was asked, but this worker's llama.cpp is built for CPU only: reinstall "
                           "llama-cpp-python with CMAKE_ARGS=\"-DGGML_CUDA=on\" for GPU offload")
    mparams.n_gpu_layers = 0x7FFFFFFF  # more than any model has: all of them
    mparams.main_gpu = int(index or 0)
    mparams.split_mode = C.LLAMA_SPLIT_MODE_NONE  # the one GPU that placement chose, not a split over all
    return mparams


class LlamaCppEngine:
    runtime = RUNTIME

    def __init__(self, path: str | Path, *, max_model_len: int | None = None, kv_cache_bytes: int | None = None,
                 max_num_seqs: int = 8, n_threads: int | None = None, n_batch: int = 512, kv_type: str = "f16",
                 flash_attn: bool | None = None, device: str = "cpu") -> None:
        """``kv_cache_bytes``: the KV cache over every sequence, as fit booked it (default: max_model_len
        tokens x min(max_num_seqs, 4)); ``max_model_len``: the most one request may hold (default: the GGUF's);
        ``kv_type``: the cache cells' type, f16 (llama.cpp's default, what fit counts) or f32; ``flash_attn``: None
        lets llama.cpp decide (on CPU it takes its flash-attention kernel, which rounds through f16); False with
        f32 cells gives the engine's fp32 logits to ~1e-4 (the tests compare them); ``device``: ``cpu``, or
        ``cuda[:N]`` to offload every layer to that GPU (a llama.cpp built with CUDA; README, GGUF models)."""
        init_backend()
        self.path = Path(path)
        mparams = offload_params(device)
        _errors.clear()
        self.model = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            said = "; ".join(_errors) or "see the worker's log"
            raise InvalidGguf(f"{self.path.name}: llama.cpp could not load this GGUF: {said}")
        trained = C.llama_model_n_ctx_train(self.model)
        self.max_model_len = min(max_model_len or trained, trained)
        self.max_num_seqs = max(1, min(max_num_seqs, 64))
        self.kv_type_bytes = KV_TYPES[kv_type][1]
        kv = (
            kv_cache_bytes // self.kv_bytes_per_token()
            if kv_cache_bytes
            else self.max_model_len * min(self.max_num_seqs, 4)
        )
        cparams = C.llama_context_default_params()
        cparams.n_ctx = max(kv, self.max_model_len)
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = self.max_num_seqs
        cparams.kv_unified = True  # one pool of cells shared by every sequence, booked per request
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type][0]
        if flash_attn is not None:
            cparams.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        threads = n_threads or int(os.environ.get("STRATA_LLAMACPP_THREADS", 0)) or (os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise InvalidGguf(f"{self.path.name}: llama.cpp could not make a context of {cparams.n_ctx} tokens")
        # llama.cpp clamps the batch to the context: a step must never hand llama_decode more than it took
        self.n_ctx, self.n_batch = C.llama_n_ctx(self.ctx), min(n_batch, C.llama_n_ubatch(self.ctx))
        self.mem = C.llama_get_memory(self.ctx)
        self.tokenizer = tokenizer_for(self.model, str(self.path))
        self.vocab_size = self.tokenizer.vocab_size
        self.model_config = SimpleNamespace(vocab_size=self.vocab_size, architecture=RUNTIME)
        vocab = C.llama_model_get_vocab(self.model)
        self.eos_ids = {t for t in range(self.vocab_size) if C.llama_vocab_is_eog(vocab, t)}
        self.generation = GenerationDefaults(eos_token_ids=sorted(self.eos_ids))
        self.device = torch.device("cpu")
        self.batch = C.llama_batch_init(self.n_batch, 0, 1)
        self.sampler = Sampler()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._incoming: list[Sequence] = []
        self._cancels: set[str] = set()
        self._live: set[str] = set()
        self._embeddings: list = []  # LLMEngine.wait_for_work reads it; this runtime embeds nothing (yet)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[str, _Slot] = {}
        self._free_ids = list(range(self.max_num_seqs))
        self._ids = itertools.count()
        self.num_preemptions = 0
        log.info(
            "llama.cpp ready: %s, %d KV cells for %d sequences, max_model_len %d, %d threads",
            self.path.name,
            self.n_ctx,
            self.max_num_seqs,
            self.max_model_len,
            threads,
        )

    # ---- what the worker reports --------------------------------------------------------------
    @property
    def weights_bytes(self) -> int:
        return int(C.llama_model_size(self.model))

    def kv_bytes_per_token(self) -> int:
        n_embd, heads = C.llama_model_n_embd(self.model), C.llama_model_n_head(self.model)
        kv_heads = C.llama_model_n_head_kv(self.model)
        return 2 * C.llama_model_n_layer(self.model) * kv_heads * (n_embd // heads) * self.kv_type_bytes  # K and V

    def cache_usage(self) -> CacheFigures:
        used = sum(s.reserved for s in self._running.values())
        return CacheFigures(self.n_ctx * self.kv_bytes_per_token(), self.n_ctx, used)

    def stats(self) -> dict:
        u = self.cache_usage()
        return {
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_preemptions": self.num_preemptions,
            "kv_cache_usage": u.usage,
            "kv_blocks_used": u.used_tokens,
            "kv_blocks_total": u.token_capacity,
        }

    # ---- requests (thread-safe): the engine's own intake -------------------------------------
    # Validation, request ids, the ContextLengthError, invalid requests finishing with "error" and
    # cancellation are LLMEngine's code, run on this object (it has the attributes that code reads:
    # tokenizer, generation, model_config.vocab_size, device, max_model_len, the queue and its lock),
    # so both runtimes refuse and cancel alike. A constraint reaches ``compile``, which refuses it.
    can_generate = True
    can_embed = False  # /v1/embeddings on this runtime: not yet

    def fail_embeddings(self, reason: str) -> None:
        """None are ever queued here."""

    add_request = LLMEngine.add_request
    cancel = LLMEngine.cancel
    has_unfinished = LLMEngine.has_unfinished
    wait_for_work = LLMEngine.wait_for_work
    generate = LLMEngine.generate
    _validate = LLMEngine._validate

    def compile(self, constraint):
        raise InvalidRequestError(
            "constrained decoding (response_format, forced tool calls) is not available on the llama.cpp runtime yet"
        )

    # ---- the loop (one thread) ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, cancel, run one llama_decode over every running request, sample, stream."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
        touched: dict[str, Sequence] = {}
        for seq in incoming:
            if seq.finished:
                touched[seq.request_id] = seq
            else:
                self._waiting.append(seq)
        for rid in cancels:
            seq = self._drop(rid)
            if seq is not None:
                seq.finish("cancelled")
                touched[rid] = seq
        self._admit()
        for seq in self._decode():
            touched[seq.request_id] = seq
        return self._emit(touched)

    def _admit(self) -> None:
        """Start waiting requests while a sequence id and their KV cells are free (booked up front, so
        a running request never finds the cache full)."""
        booked = sum(s.reserved for s in self._running.values())
        while self._waiting and self._free_ids:
            seq = self._waiting[0]
            need = min(len(seq) + (seq.params.max_tokens or self.max_model_len), self.max_model_len)
            if booked + need > self.n_ctx:
                break
            self._waiting.popleft()
            seq.metrics.first_scheduled_time = time.time()
            self._running[seq.request_id] = _Slot(seq, self._free_ids.pop(0), need)
            booked += need

    def _decode(self) -> list[Sequence]:
        """One batch: each decoding request's last token first, then prompt chunks within n_batch."""
        rows: list[tuple[_Slot, int]] = []  # (slot, batch index of its logits row), in batch order
        n, b = 0, self.batch
        slots = sorted(self._running.values(), key=lambda s: s.n_past < len(s.seq.prompt_ids))
        for slot in slots:
            todo = slot.seq.token_slice(slot.n_past, len(slot.seq))
            take = todo[: self.n_batch - n]
            if not take:
                continue
            for j, token in enumerate(take):
                b.token[n + j], b.pos[n + j] = token, slot.n_past + j
                b.n_seq_id[n + j], b.seq_id[n + j][0] = 1, slot.seq_id
                b.logits[n + j] = 0
            slot.n_past += len(take)
            n += len(take)
            if slot.n_past == len(slot.seq):  # the whole prompt (or the new token) is in: sample from it
                b.logits[n - 1] = 1
                rows.append((slot, n - 1))
            if n >= self.n_batch:
                break
        if n == 0:
            return []
        b.n_tokens = n
        code = C.llama_decode(self.ctx, b)
        if code != 0:  # never take the engine down with one bad batch: fail its requests
            failed = []
            for slot in list(self._running.values()):
                slot.seq.finish("error", error=f"llama_decode failed with code {code}")
                failed.append(self._drop(slot.seq.request_id))
            return [s for s in failed if s is not None]
        if not rows:
            return []
        # the rows asked for (batch.logits set) lie contiguously in batch order: one copy out of llama.cpp's buffer
        logits = np.ctypeslib.as_array(C.llama_get_logits(self.ctx), shape=(len(rows), self.vocab_size)).copy()
        seqs = [slot.seq for slot, _ in rows]
        if all(_plain_greedy(s.params) for s in seqs):
            # the Sampler's greedy row is this argmax (both take the first of equal maxima); numpy's costs
            # microseconds where torch's intra-op threads took ~8 ms a step on a busy 2-core machine
            ids, lps = logits.argmax(axis=1).tolist(), [None] * len(seqs)
        else:
            history = [(s.prompt_ids, s.output_ids) for s in seqs] if any(s.params.penalized for s in seqs) else None
            ids, lps = self.sampler(
                torch.from_numpy(logits), [s.params for s in seqs], [s.generator for s in seqs], history
            )
        for seq, token, lp in zip(seqs, ids, lps):
            seq.append(token, lp, self.max_model_len)
        for seq in seqs:
            if seq.finished:
                self._drop(seq.request_id)
        return seqs

    def _drop(self, rid: str) -> Sequence | None:
        """Take a request out of the queue or free its sequence id and KV cells."""
        slot = self._running.pop(rid, None)
        if slot is not None:
            C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            self._free_ids.append(slot.seq_id)
            return slot.seq
        for seq in self._waiting:
            if seq.request_id == rid:
                self._waiting.remove(seq)
                return seq
        return None

    def _emit(self, touched: dict[str, Sequence]) -> list[RequestOutput]:
        outputs = []
        for rid, seq in touched.items():
            if seq.finished:
                with self._lock:
                    self._live.discard(rid)
                outputs.append(seq.output())
            seq.stream()
        return outputs

    def close(self) -> None:
        """Free llama.cpp's context, batch and model (the worker calls this at unload)."""
        if getattr(self, "ctx", None):
            C.llama_batch_free(self.batch)
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None


def _plain_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0 and params.logprobs is None and not params.penalized and not params.logit_bias


class InvalidGguf(Exception):
    """llama.cpp refused the file (an architecture or quantization this build does not know)."""
