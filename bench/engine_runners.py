"""The timed runs of bench/engine.py: the Strata engine (decode timed from per-token timestamps) and
HF transformers.generate (eager, and with a static cache + torch.compile)."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from unittest import mock

import torch

from bench.roofline import sync


class Variant(NamedTuple):
    """An engine variant's name parsed: ``KIND[-nogemv][-compiled]``."""

    kind: str
    gemv: bool  # False: "-nogemv", kernels/cpu_gemv.py off (torch's kernels)
    compiled: bool  # "-compiled": the compiled decode step (engine/compiled_decode.py), compiled at load

    @classmethod
    def parse(cls, name: str) -> Variant:
        kind, compiled = name.removesuffix("-compiled"), name.endswith("-compiled")
        return cls(kind.removesuffix("-nogemv"), not kind.endswith("-nogemv"), compiled)

    def loading(self):
        """The environment to load this variant's engine in (the loops are chosen at load)."""
        return mock.patch.dict(os.environ, {"STRATA_CPU_GEMV": "on" if self.gemv else "off"})


@dataclass
class DecodeRun:
    """One timed generate of ``batch`` prompts x ``new_tokens`` greedy tokens."""
    batch: int
    new_tokens: int
    wall_s: float  # the whole call, prefill included
    decode_tok_s: float  # tokens after every request's first token / the time they took
    gaps_s: list[float] = field(default_factory=list)  # per-request gaps between consecutive tokens

    @property
    def whole_tok_s(self) -> float:
        return self.batch * self.new_tokens / self.wall_s


class StrataBench:
    """One engine sized for the largest batch, reused for every row. Each run streams its tokens to
    callbacks that stamp the host clock: the engine samples to host ints, so a stamp is taken after
    that step's device work. Decode throughput counts the tokens after the moment every request has
    its first token (the prefill is done) up to the last token."""

    def __init__(self, path, device: str, dtype, max_batch: int, prompt_len: int, new_tokens: int,
                 quantize: str | None = None, compile_decode: str = "off"):
        from services.inference_worker.api import EngineConfig, LLMEngine, SamplingParams

        self.device = device
        blocks = max_batch * (-(-(prompt_len + new_tokens) // 16) + 1) + 8
        self.engine = LLMEngine.from_pretrained(path, EngineConfig(
            device=device, dtype=dtype, quantize=quantize, num_blocks=blocks, block_size=16, max_num_seqs=max_batch,
            max_num_batched_tokens=max(max_batch * prompt_len, 512), compile_decode=compile_decode))
        self.params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        self.warm_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        self.new_tokens = new_tokens

    def warm(self, prompts) -> None:
        self.engine.generate(prompts, self.warm_params)

    def run(self, prompts) -> DecodeRun:
        stamps: dict[str, list[float]] = {}

        def on_token(event) -> None:
            if event.token_ids:
                stamps.setdefault(event.request_id, []).extend(
                    [time.perf_counter()] * len(event.token_ids))

        eng = self.engine
        sync(self.device)
        t0 = time.perf_counter()
        rids = [eng.add_request(p, self.params, callback=on_token) for p in prompts]
        while eng.has_unfinished():
            eng.step()
        sync(self.device)
        wall = time.perf_counter() - t0
        got = [len(stamps.get(r, [])) for r in rids]
        if any(n != self.new_tokens for n in got):
            raise RuntimeError(f"expected {self.new_tokens} streamed tokens per request, got {got}")
        return decode_run(len(prompts), self.new_tokens, wall, [stamps[r] for r in rids])


def decode_run(batch: int, new_tokens: int, wall: float, stamps: list[list[float]]) -> DecodeRun:
    start = max(s[0] for s in stamps)  # every request has its first token: prefill is over
    end = max(s[-1] for s in stamps)
    decoded = sum(1 for s in stamps for t in s if t > start)
    rate = decoded / (end - start) if end > start else float("nan")
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return DecodeRun(batch, new_tokens, wall, rate, gaps)


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (-1 where torch hides the count)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private API: a missing count must not stop the benchmark
        return -1


# ---- HF transformers baselines -------------------------------------------------------------------
@dataclass
class HFVariant:
    name: str
    how: str  # what was configured, printed next to the figures
    generation_config: object
    compiled_forward: object = None  # fallback path: a torch.compile'd forward swapped in per call
    error: str | None = None  # why this variant could not run


def compile_config_class():
    """transformers.CompileConfig (4.47+), or None on an older transformers."""
    try:
        from transformers import CompileConfig
        return CompileConfig
    except ImportError:
        return None


def hf_variants(hf, device: str, compile_: bool) -> list[HFVariant]:
    """HF eager (dynamic cache) and HF with a static cache, compiled with torch.compile(mode=
    "default") when compile_ (reduce-overhead failed on an H200 with transformers 5.17: "accessing
    tensor output of CUDAGraphs that has been overwritten"). Each variant passes its own
    GenerationConfig, so the shared model is never left in another variant's mode."""
    eager = copy.deepcopy(hf.generation_config)
    eager.cache_implementation = None
    eager.disable_compile = True  # an unknown attribute on older transformers: harmless
    out = [HFVariant("HF eager", "generate(), dynamic cache, no compile", eager)]
    static = copy.deepcopy(hf.generation_config)
    static.cache_implementation = "static"
    if not compile_:
        static.disable_compile = True  # transformers would otherwise auto-compile on CUDA
        out.append(HFVariant("HF static", "cache_implementation='static', compile off "
                             "(--no-hf-compile or CPU default)", static))
        return out
    compile_config_cls = compile_config_class()
    if compile_config_cls is not None:  # transformers >= 4.47: generate compiles the decode steps
        cc = compile_config_cls(mode="default")
        if torch.device(device).type != "cuda":
            cc._compile_all_devices = True  # transformers compiles on CUDA-like devices only
        static.compile_config, static.disable_compile = cc, False
        how = ("cache_implementation='static', compile_config=CompileConfig(mode='default'): "
               "generate compiles the decode-step forward")
        out.append(HFVariant("HF static+compile", how, static))
    else:
        static.disable_compile = True
        how = "cache_implementation='static', model.forward = torch.compile(forward, mode='default')"
        out.append(HFVariant("HF static+compile", how, static,
                             compiled_forward=torch.compile(hf.forward, mode="default")))
    return out


class _TokenClock:
    """A transformers streamer that only notes when each put() arrives: generate() puts the prompt
    first, then each step's new tokens as soon as that step's sampling is done."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _tokens) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFBench:
    """Times hf.generate for one variant. Decode time runs from the first new token (the prefill's)
    to the last, as a streamer sees them arrive, so it is measured in the same run as the whole time;
    differencing a long and a short run instead came out negative under load on tiny models."""

    def __init__(self, hf, variant: HFVariant, device: str, new_tokens: int):
        if new_tokens < 2:
            raise ValueError("a decode rate needs at least 2 new tokens")
        self.hf, self.v, self.device, self.new_tokens = hf, variant, device, new_tokens
        self.warm_s: float | None = None
        self.graphs = 0

    def _generate(self, ids) -> tuple[float, float]:
        gen = self.v.generation_config  # all settings on it: transformers 5 warns about a mix
        n = self.new_tokens
        gen.do_sample, gen.pad_token_id, gen.max_new_tokens, gen.min_new_tokens = False, 0, n, n
        clock = _TokenClock()
        kw = dict(attention_mask=torch.ones_like(ids), generation_config=gen, streamer=clock)
        swap = self.v.compiled_forward is not None
        if swap:  # an instance attribute shadows the class's forward for this call only
            self.hf.forward = self.v.compiled_forward
        try:
            with torch.inference_mode():
                sync(self.device)
                t = time.perf_counter()
                out = self.hf.generate(ids, **kw)
                sync(self.device)
                dt = time.perf_counter() - t
        finally:
            if swap:
                del self.hf.forward
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, asked {n}")
        if len(clock.times) != n + 1:  # the prompt, then one put per new token
            raise RuntimeError(f"HF streamed {len(clock.times) - 1} steps for {n} tokens")
        return dt, clock.times[-1] - clock.times[1]

    def warm(self, ids) -> None:
        """Twice at full length: the first sizes the static cache and compiles."""
        graphs = dynamo_graphs()
        t = time.perf_counter()
        self._generate(ids)
        self._generate(ids)
        self.warm_s = time.perf_counter() - t
        self.graphs = dynamo_graphs() - graphs

    def compiled(self) -> str | None:
        """Whether torch.compile really ran, as torch._dynamo counted it (None: not asked for)."""
        if "compile" not in self.v.name:
            return None
        return f"yes, {self.graphs} graph(s)" if self.graphs > 0 else "NO (dynamo compiled no graph)"

    def run(self, ids) -> tuple[float, float]:
        """(seconds for the whole run, seconds from the first new token to the last)."""
        return self._generate(ids)

    def rates(self, whole_s: float, decode_s: float, batch: int) -> tuple[float, float]:
        """(whole-run tok/s, decode-only tok/s) from the best times."""
        return batch * self.new_tokens / whole_s, batch * (self.new_tokens - 1) / decode_s
