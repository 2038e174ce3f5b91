"""Owns the KV cache tensor, turns a scheduled batch into flat model inputs, runs the model and
samples."""
from __future__ import annotations

import logging

import torch

from .block_manager import NULL_BLOCK
from .compiled_decode import CompiledDecode
from .guided import allowed_tokens
from .config import EngineConfig, ModelConfig
from .model import AttentionMetadata, PrefillChunk, Transformer
from .sampling import Sampler, TokenLogprob
from .scheduler import ScheduledSeq
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: Transformer, cfg: ModelConfig, ecfg: EngineConfig, max_model_len: int):
        self.model, self.cfg, self.ecfg = model, cfg, ecfg
        self.device = model.norm.device
        self.dtype = model.norm.dtype
        self.block_size = ecfg.block_size
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.bytes_per_block = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem
        self.num_blocks = self._decide_num_blocks()  # usable blocks, the null block not counted
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]: num_blocks + 1 blocks, the first
        # the null block (see block_manager.py); zeroed, so padding and freed entries read zeros
        self.kv_cache = torch.zeros(cfg.num_layers, 2, self.num_blocks + 1, self.block_size,
                                    cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device)
        self.decode_graph: CompiledDecode | None = None
        if ecfg.compile_decode != "off":
            why_not = CompiledDecode.unsupported(model, self.device)
            if why_not and ecfg.compile_decode == "on":
                raise ValueError(f"compile_decode: {why_not}")
            if why_not:
                log.info("decode runs eager: %s", why_not)
            else:
                self.decode_graph = CompiledDecode(model, self.block_size)
                self.decode_graph.warm_up(self.kv_cache)

    # ---- sizing -------------------------------------------------------------------------------
    def _decide_num_blocks(self) -> int:
        ec = self.ecfg
        if ec.num_blocks is not None:
            return ec.num_blocks
        if ec.kv_cache_bytes is not None:
            budget = ec.kv_cache_bytes
        elif self.device.type == "cuda":
            budget = self._cuda_budget()
        else:  # enough for max_num_seqs full-length sequences, capped
            want = (ec.max_num_seqs * -(-self.max_model_len // self.block_size) + 1) * self.bytes_per_block
            budget = min(want, ec.cpu_kv_cache_bytes)
        n = int(budget // self.bytes_per_block) - 1  # the null block comes out of the budget too
        if n < 1:
            raise RuntimeError(f"KV cache budget of {budget / 2**20:.1f} MiB is smaller than two blocks "
                               f"({self.bytes_per_block / 2**20:.2f} MiB each, one of them the null block)")
        return n

    def _cuda_budget(self) -> int:
        """gpu_memory_utilization of the card minus what is used outside the cache: weights, others'
        memory, and the activation peak of a profiling run at the largest step."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        others = max(0, (total - free) - torch.cuda.memory_reserved(self.device))
        n = min(self.ecfg.max_num_batched_tokens, self.max_model_len)
        with torch.inference_mode():
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            meta = AttentionMetadata(slot_mapping=None, prefills=[PrefillChunk(0, n)])
            h = self.model(ids, torch.arange(n, device=self.device), meta)
            rows = min(self.ecfg.max_num_seqs, n)
            self.model.compute_logits(h[:rows]).softmax(-1)
            del h
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return int(total * self.ecfg.gpu_memory_utilization - peak - others)

    # ---- one step -----------------------------------------------------------------------------
    def prepare(self, batch: list[ScheduledSeq]):
        """Flatten the batch: single-token steps (decode) first, then prefill chunks."""
        bs = self.block_size
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        ids, pos, slots, logit_rows, sample_seqs = [], [], [], [], []
        tables, ctx_lens = [], []
        for s in decodes:
            seq, p = s.seq, s.seq.num_computed
            ids += seq.token_slice(p, p + 1)
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            tables.append(seq.block_table)
            ctx_lens.append(p + 1)
            if s.samples:
                logit_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        chunks = []
        for s in prefills:
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            t0 = len(ids)
            ids += seq.token_slice(start, start + n)
            pos += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            bt = self._to_device(table[:-(-(start + n) // bs)], torch.long) if start else None
            chunks.append(PrefillChunk(t0, t0 + n, start, bt, len(seq)))
            if s.samples:
                logit_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata(slot_mapping=self._to_device(slots, torch.long),
                                 num_decode=len(decodes), prefills=chunks)
        if decodes:
            width = max(len(t) for t in tables)
            meta.block_tables = self._to_device([t + [NULL_BLOCK] * (width - len(t)) for t in tables],
                                                torch.int32)
            meta.context_lens = self._to_device(ctx_lens, torch.int32)
        return (self._to_device(ids, torch.long), self._to_device(pos, torch.long), meta,
                self._to_device(logit_rows, torch.long), sample_seqs)

    def _to_device(self, data, dtype) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.tensor(data, dtype=dtype, pin_memory=pin).to(self.device, non_blocking=pin)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        ids, pos, meta, rows, seqs = self.prepare(batch)
        if self.decode_graph is not None and not meta.prefills and len(ids) <= CompiledDecode.MAX_ROWS:
            hidden = self.decode_graph(ids, pos, meta.block_tables, meta.context_lens, meta.slot_mapping,
                                       self.kv_cache)
        else:
            hidden = self.model(ids, pos, meta, self.kv_cache)
        if not seqs:
            return []
        logits = self.model.compute_logits(hidden[rows])
        params = [s.params for s in seqs]
        history = [(s.prompt_ids, s.output_ids) for s in seqs] if any(p.penalized for p in params) else None
        slow: list[tuple[int, float]] = []
        allowed = allowed_tokens([s.matcher for s in seqs], logits.shape[-1], logits.device, slow)
        for row, seconds in slow:
            seqs[row].mask_seconds = seconds
        token_ids, logprobs = self.sampler(logits, params, [s.generator for s in seqs], history, allowed)
        return list(zip(seqs, token_ids, logprobs))
