"""A compiled decode step for CPU (EngineConfig.compile_decode, issue #24).

On CPU an eager decode step runs ~1,400 small torch ops around its matmuls, and at a few microseconds
each they cost 7–10 ms a step on a 2-core node, as much as half the step. ``torch.compile`` (inductor,
C++ wrapper) fuses them into a few loops called from C++; the matmuls stay what they were (the
prepacked oneDNN/fbgemm calls of engine/cpu_linear.py, custom ops inductor calls as they are).

The compiled step is a decode-only forward with one change that keeps it a pure function of the cache:
attention reads the cache *without* the current token and joins its k and v as one more column
(``attend_appended``), and each layer's new k and v are returned; ModelRunner writes all of them with one
``index_copy_`` after the step. (A graph that writes into the cache itself is functionalised by
inductor into a copy of the whole cache per layer: 200 ms a step on the #24 model.) The math is the
eager decode's (fp32 scores and softmax over the same slots) in another order, and inductor is told to
round to 16 bits between fused ops where eager does (``emulate_precision_casts``), so results differ from
eager only by the order of fp32 sums; tests/engine/test_compiled_decode.py states the tolerance.

Shapes: dynamic (batch and block-table width), with two graphs because torch specialises a size of 1:
batch 1 and batch 2 to MAX_ROWS (larger decode batches run eager: see MAX_ROWS); block tables are padded to
at least 2 columns so width 1 never makes a third.
Both are compiled at load (``warm_up``), not on the first request; inductor's on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``) makes a second load of the same model shape fast.

Not covered: MoE layers (data-dependent routing), CUDA (the CUDA-graph version is untested without a
GPU): ``compile_decode="on"`` refuses them with the reason, ``"auto"`` runs them eager.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.paged_attention import _make_plan, attend_gathered

log = logging.getLogger(__name__)


@dataclass
class DecodeOnly:
    """AttentionMetadata's stand-in for a compiled decode step: every row is one decode token, the
    cache is read, never written, and each layer appends its (k, v) to ``new_kv``."""
    plans: dict  # window (None: full attention) -> (blocks, masked incl. the appended column, n_slots)
    new_kv: list = field(default_factory=list)
    prefills: tuple = ()  # none: Transformer._rope_rows reads this


def decode_plans(block_tables: Tensor, context_lens: Tensor, windows: set, block_size: int,
                 num_blocks: int) -> dict:
    """For each window, the cache slots to gather for the tokens *before* the current one (it sits at
    context_len - 1 and joins as the last column), and the mask over those slots plus that column."""
    before = context_lens - 1
    plans = {}
    for window in windows:  # a window of w covers the current token and the w - 1 before it
        blocks, masked, n_slots = _make_plan(block_tables, before, None if window is None else window - 1,
                                             block_size, num_blocks)
        plans[window] = (blocks, torch.cat((masked, masked.new_zeros(masked.shape[0], 1)), 1), n_slots)
    return plans


def attend_appended(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, plan: tuple, scale: float,
                    softcap: float | None) -> Tensor:
    """Decode attention of q [B, n_q, d] over the gathered cache ``kv`` [2, blocks, block_size, n_kv, d]
    plus this token's own k, v [B, n_kv, d]: the paged reference's math, one column more."""
    blocks, masked, n_slots = plan
    B, _, d = q.shape
    n_kv = k.shape[1]
    K = torch.cat((kv[0].index_select(0, blocks).view(B, n_slots, n_kv, d), k[:, None]), 1)
    V = torch.cat((kv[1].index_select(0, blocks).view(B, n_slots, n_kv, d), v[:, None]), 1)
    V = V.masked_fill(masked[:, :, None, None], 0.0)  # a masked slot may hold NaN: 0 * NaN is NaN
    return attend_gathered(q, K, V, masked, scale, softcap)


class CompiledDecode:
    """The model's decode-only forward under torch.compile; call it with a decode-only batch."""

    MIN_WIDTH = 2  # block-table columns: width 1 would be a graph of its own
    # Decode batches up to this many rows run compiled, larger ones eager. On #24's 254M model in bf16
    # (bench/decode_overhead.py --compiled-rows, one thread, load 1.0, median step ms, eager -> compiled):
    # 1 row 51.0 -> 43.8, 2: 53.3 -> 49.7, 4: 56.4 -> 55.5, 6: 58.3 -> 61.6, 8: 61.7 -> 67.6. Past a few rows
    # the step is the matmuls', and the graph's own loops (the attention around the cache) took 24.6 ms at
    # 8 rows where eager's ops took ~12 (one profiled step; docs/benchmarks.md §3c, third session).
    MAX_ROWS = 4
    instances = 0

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        cfg = model.cfg
        self.windows = set(cfg.layer_windows) if cfg.layer_windows else {None}
        # emulate_precision_casts: round to 16 bits between fused ops wherever eager does, so results match
        # eager's (without it, 7 of 100 greedy continuations of the built-in model differed; with it none)
        self.compiled = torch.compile(self._forward, dynamic=True, fullgraph=True,
                                      options={"cpp_wrapper": True, "emulate_precision_casts": True})
        # Every instance's graphs (two each) hang off the one code object of _forward, and past torch's
        # recompile limit (8) a further deployment would silently run its decode step uncompiled.
        CompiledDecode.instances += 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * self.instances + 2)
        self.compile_seconds = 0.0
        self.steps = 0  # decode steps run compiled

    @staticmethod
    def unsupported(model, device: torch.device) -> str | None:
        """Why this model on this device cannot run the compiled step, or None."""
        if device.type != "cpu":
            return "CPU only: the CUDA-graph decode step is not built yet"
        if any(model.cfg.moe_layers):
            return "MoE layers are not supported (their routing is data-dependent)"
        return None

    def _forward(self, ids: Tensor, positions: Tensor, block_tables: Tensor, context_lens: Tensor,
                 kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        meta = DecodeOnly(decode_plans(block_tables, context_lens, self.windows, self.block_size,
                                       kv_cache.shape[2]))
        hidden = self.model(ids, positions, meta, kv_cache)
        return hidden, torch.stack(meta.new_kv)  # [layers * 2, B, n_kv, d]: k0, v0, k1, v1, ...

    def __call__(self, ids: Tensor, positions: Tensor, block_tables: Tensor, context_lens: Tensor,
                 slot_mapping: Tensor, kv_cache: Tensor) -> Tensor:
        if block_tables.shape[1] < self.MIN_WIDTH:  # the null block, masked out by context_lens
            pad = block_tables.new_zeros(block_tables.shape[0], self.MIN_WIDTH - block_tables.shape[1])
            block_tables = torch.cat((block_tables, pad), 1)
        hidden, new_kv = self.compiled(ids, positions, block_tables, context_lens, kv_cache)
        self.steps += 1
        layers, _, blocks, block_size, n_kv, d = kv_cache.shape
        kv_cache.view(layers * 2, blocks * block_size, n_kv, d).index_copy_(1, slot_mapping, new_kv)
        return hidden

    def warm_up(self, kv_cache: Tensor) -> float:
        """Compile both graphs (batch 1 and batch >= 2) on dummy rows that read only the null block and
        write nothing; returns the seconds it took."""
        begun = time.perf_counter()
        device = kv_cache.device
        # One tensor for the engine's life: its sizes are constants. Left dynamic, a cache dimension and the
        # batch or table width that happened to equal it at compile time (2 layers, 2 rows, 2 columns)
        # became one symbol, and the first wider table recompiled while serving.
        torch._dynamo.mark_static(kv_cache)
        with torch.inference_mode():
            for batch in (1, 2):
                ids = torch.zeros(batch, dtype=torch.long, device=device)
                # a width unlike the batch, so that the two are not taken for one size either
                tables = torch.zeros(batch, self.MIN_WIDTH + batch, dtype=torch.int32, device=device)
                self.compiled(ids, ids.clone(), tables, torch.ones(batch, dtype=torch.int32, device=device), kv_cache)
        self.compile_seconds = time.perf_counter() - begun
        log.info("compiled the decode step in %.1f s", self.compile_seconds)
        return self.compile_seconds
