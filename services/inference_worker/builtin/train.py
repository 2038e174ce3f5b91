"""Train Strata's built-in model: a small Llama on the bundled King James Bible text.

``train(out_dir)`` (and ``main(argv)``, which ``strata train`` calls) does, in one process:

1. reads ``corpus/kjv.txt`` and checks its sha256 against ``CORPUS_SHA256``;
2. trains a byte-level BPE tokenizer on it (``tokenizers``) with chat special tokens;
3. turns the corpus into one token stream of documents: every chapter as plain text between
   ``<|bos|>`` and ``<|eos|>``, plus every ``chat_every``-th chapter a second time rendered
   through the chat template as a user/assistant conversation (so that a chat prompt is
   something the model has seen and it learns to end a reply with ``<|eos|>``);
   every ``val_every``-th chapter is held out for the validation loss;
4. trains a Llama-architecture decoder with AdamW on random windows of that stream (fixed
   seed, fixed data order, fixed thread count);
5. writes an HF-format checkpoint (``config.json``, ``model.safetensors`` with HF tensor names,
   ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
   ``generation_config.json``) and ``training_record.json`` next to it.

Reproducibility: with the same seed, hyper-parameters, thread count and software versions on
the same kind of CPU, a run gives bitwise-identical weights (tests check this on short runs).
Across CPUs, thread counts or torch versions the floating-point reductions differ, so the
weights differ in the last bits and the loss curve agrees only approximately; the corpus, the
tokenizer and the data order are the same everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import BUILTIN_DIR as HERE
from . import CORPUS_DIR, MODEL_NAME
from . import MODEL_DIR as SHIPPED_MODEL_DIR

CORPUS_PATH = CORPUS_DIR / "kjv.txt"
CORPUS_SHA256 = "6041a30e2c1b66c040d5c01bbb0b95396627dab83870d5d13248d2c5c99bed5d"
RECORD_NAME = "training_record.json"
RECORD_FORMAT = "strata.builtin.training_record/1"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]  # ids 0..5, in this order

# Rendered with jinja2 (as transformers and the engine do). A conversation renders to
#   <|bos|><|user|>\n{content}\n<|assistant|>\n{content}<|eos|>\n<|user|>\n...
# and add_generation_prompt appends "<|assistant|>\n" for the model to continue.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ARTIFACT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


class TrainError(ValueError):
    """A bad argument or an unusable output directory; the message says which and why."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run. The defaults are the shipped model's run."""

    steps: int = 700
    seed: int = 1234
    # tokenizer
    vocab_size: int = 2048
    # model (Llama architecture)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    # data
    seq_len: int = 256
    batch_size: int = 4
    chat_every: int = 3
    chat_reply_verses: int = 1
    val_every: int = 25
    # optimisation
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    log_every: int = 25
    eval_batches: int = 8
    threads: int = 2
    save_dtype: str = "bfloat16"
    trainer: str = "auto"  # auto: our engine's model when importable, else transformers

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise TrainError(f"{name} must be a positive number, got {value!r}")

        for name in ("steps", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "seq_len", "batch_size", "chat_every",
                     "chat_reply_verses", "val_every", "log_every", "eval_batches", "threads",
                     "lr", "rope_theta", "rms_norm_eps", "init_std"):
            positive(name)
        for name in ("steps", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "seq_len", "batch_size", "chat_every",
                     "chat_reply_verses", "val_every", "log_every", "eval_batches", "threads",
                     "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrainError(f"{name} must be an integer, got {value!r}")
        if self.seed < 0:
            raise TrainError(f"seed must be >= 0, got {self.seed}")
        if self.warmup_steps < 0:
            raise TrainError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TrainError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                             f"got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise TrainError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise TrainError("head dim (hidden_size / num_heads) must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise TrainError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.chat_every < 2 or self.val_every < 2:
            raise TrainError("chat_every and val_every must be >= 2")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise TrainError("beta1 and beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainError("weight_decay and grad_clip must be >= 0 (grad_clip 0 disables it)")
        if self.trainer not in TRAINERS:
            raise TrainError(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise TrainError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")


# --------------------------------------------------------------------------------------------
# corpus and tokenizer


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_corpus(path: Path = CORPUS_PATH, expected_sha256: str | None = CORPUS_SHA256) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainError(f"cannot read the corpus {path}: {e}") from e
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise TrainError(f"corpus {path} has sha256 {digest}, expected {expected_sha256}; "
                         "it was modified (see corpus/README.md for how it is built)")
    return data.decode("ascii")


def split_chapters(text: str) -> list[tuple[str, list[str]]]:
    """``[(heading, [verse, ...]), ...]`` from the corpus layout (see corpus/make_corpus.py)."""
    chapters = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if len(lines) >= 2:
            chapters.append((lines[0], lines[1:]))
    return chapters


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render CHAT_TEMPLATE the way transformers and our engine do (sandboxed jinja2,
    trim_blocks and lstrip_blocks)."""
    return _chat_template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=BOS, eos_token=EOS)


@functools.lru_cache(maxsize=1)
def _chat_template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        CHAT_TEMPLATE)


def chapter_as_chat(heading: str, verses: list[str], reply_verses: int = 2,
                    max_turns: int = 4) -> list[str]:
    """One chapter as conversations: the user gives the heading or a verse, the assistant
    answers with the next ``reply_verses`` verses and ``<|eos|>``. A long chapter becomes
    several conversations of at most ``max_turns`` exchanges."""
    convs: list[str] = []
    messages: list[dict[str, str]] = []
    i, prompt = 0, heading
    while i < len(verses):
        reply = verses[i:i + reply_verses]
        i += len(reply)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": " ".join(reply)})
        if len(messages) >= 2 * max_turns or i >= len(verses):
            convs.append(render_chat(messages))
            messages = []
        if i < len(verses):
            prompt = verses[i]
            i += 1
    return convs


def build_documents(chapters, chat_every: int, val_every: int,
                    reply_verses: int = 2) -> tuple[list[str], list[str]]:
    train_docs, val_docs = [], []
    for idx, (heading, verses) in enumerate(chapters):
        plain = BOS + heading + "\n" + "\n".join(verses) + "\n" + EOS
        if idx % val_every == val_every - 1:
            val_docs.append(plain)
            continue
        train_docs.append(plain)
        if idx % chat_every == 0:
            train_docs.extend(chapter_as_chat(heading, verses, reply_verses))
    return train_docs, val_docs


def encode_stream(tok, docs: list[str]):
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# model


def hf_config(cfg: TrainConfig, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": cfg.save_dtype,
        "use_cache": True,
    }


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF Llama checkpoint this config describes, name -> shape."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def init_hf_state(config: dict[str, Any], std: float, seed: int) -> dict[str, Any]:
    """The initial weights under HF names, drawn in sorted-name order from ``seed``: the start
    point depends only on the seed and the shapes, not on which module class trains it.
    Norms start at 1; residual-output projections get std / sqrt(2 * layers) (GPT-2 style)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(hf_tensor_shapes(config).items()):
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            s = std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                s = std / math.sqrt(2 * config["num_hidden_layers"])
            out[name] = torch.randn(shape, generator=gen) * s
    return out


class _Backend:
    """The module being trained: [batch, seq] ids -> [batch, seq, vocab] logits, and its
    weights read and written under HF tensor names."""

    name: str
    module: Any

    def logits(self, input_ids):  # pragma: no cover - interface
        raise NotImplementedError

    def hf_state_dict(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def load_hf_state(self, state: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _EngineBackend(_Backend):
    """Our own model (services/inference_worker/engine/model.py). Its forward takes a flat
    batch of tokens with attention metadata; with ``slot_mapping=None`` and no cache it is a
    plain causal forward, one prefill chunk per training sequence. On CPU the kernels are
    the plain-torch references, so autograd flows through them."""

    name = "strata.engine.Transformer"

    def __init__(self, config: dict[str, Any]):
        import torch

        from ..engine.config import ModelConfig
        from ..engine.model import AttentionMetadata, PrefillChunk, Transformer, hf_weight_names

        self._meta_cls, self._chunk_cls = AttentionMetadata, PrefillChunk
        self.cfg = ModelConfig.from_dict(config, source="builtin train config")
        self.module = Transformer(self.cfg)
        self.module.init_rope(config["max_position_embeddings"])
        self._names = hf_weight_names(self.cfg)
        self._shapes = hf_tensor_shapes(config)
        self._torch = torch

    def logits(self, input_ids):
        torch = self._torch
        b, t = input_ids.shape
        meta = self._meta_cls(slot_mapping=None,
                              prefills=[self._chunk_cls(i * t, (i + 1) * t) for i in range(b)])
        positions = torch.arange(t).repeat(b)
        hidden = self.module(input_ids.reshape(-1), positions, meta)
        return self.module.compute_logits(hidden).view(b, t, -1)

    def hf_state_dict(self) -> dict:
        sd = self.module.state_dict()
        out = {}
        for ours, hf_names in self._names.items():
            rows = [self._shapes[n][0] for n in hf_names]
            for n, part in zip(hf_names, sd[ours].split(rows, dim=0)):
                out[n] = part
        return out

    def load_hf_state(self, state: dict) -> None:
        torch = self._torch
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for ours, hf_names in self._names.items():
                params[ours].copy_(torch.cat([state[n] for n in hf_names], dim=0))


class _TransformersBackend(_Backend):
    # FALLBACK ONLY: used when our engine's model cannot be imported (or when asked for with
    # trainer="transformers"). transformers' LlamaForCausalLM is then the training step's
    # module; the checkpoint it writes is the same HF format either way.
    name = "transformers.LlamaForCausalLM"

    def __init__(self, config: dict[str, Any]):
        from transformers import LlamaConfig, LlamaForCausalLM

        kwargs = {k: v for k, v in config.items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
        hf_cfg = LlamaConfig(**kwargs)
        hf_cfg._attn_implementation = "sdpa"
        self.module = LlamaForCausalLM(hf_cfg)

    def logits(self, input_ids):
        return self.module(input_ids=input_ids, use_cache=False).logits

    def hf_state_dict(self) -> dict:
        sd = dict(self.module.state_dict())
        if self.module.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_hf_state(self, state: dict) -> None:
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight"
                                               and self.module.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"weight mismatch: missing {missing}, unexpected {unexpected}")


TRAINERS = ("auto", "engine", "transformers")


def make_backend(config: dict[str, Any], trainer: str = "auto") -> _Backend:
    if trainer not in TRAINERS:
        raise TrainError(f"trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")
    if trainer in ("auto", "engine"):
        try:
            return _EngineBackend(config)
        except ImportError:
            if trainer == "engine":
                raise
    return _TransformersBackend(config)


def count_parameters(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _eval_windows(stream, seq_len: int, n: int):
    import torch

    usable = stream.numel() - seq_len - 1
    if usable <= 0:
        raise TrainError(f"the validation split ({stream.numel()} tokens) is shorter than "
                         f"seq_len {seq_len}")
    starts = torch.linspace(0, usable, n).long()
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def _loss(backend: _Backend, batch):
    import torch.nn.functional as F

    logits = backend.logits(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def _evaluate(backend: _Backend, windows, chunk: int = 8) -> float:
    import torch

    backend.module.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.size(0), chunk):
            part = windows[i:i + chunk]
            total += _loss(backend, part).item() * part.size(0)
    backend.module.train()
    return total / windows.size(0)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not overwrite:
        clash = [n for n in (*ARTIFACT_FILES, RECORD_NAME) if (out_dir / n).exists()]
        if clash:
            raise TrainError(f"output directory {out_dir} already holds a checkpoint "
                             f"({', '.join(clash)}); pass overwrite=True (--force) to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainError(f"output directory {out_dir} is not writable: {e}") from e


def _git_commit() -> dict[str, Any]:
    try:
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(HERE)], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout
        return {"git_commit": commit, "builtin_dir_dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "builtin_dir_dirty": None}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def train(
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the built-in model and write the checkpoint + ``training_record.json`` to
    ``out_dir``. Keyword overrides are ``TrainConfig`` fields. Returns the record."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TrainError(f"unknown training option(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    if steps is not None:
        overrides["steps"] = steps
    if seed is not None:
        overrides["seed"] = seed
    cfg = TrainConfig(**overrides)
    cfg.validate()
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    say = log or (lambda _msg: None)

    _short_omp_spin()
    import torch
    from safetensors.torch import save_file

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # data ------------------------------------------------------------------------------
        text = load_corpus()
        chapters = split_chapters(text)
        tok = train_tokenizer(text, cfg.vocab_size)
        tok_json = tok.to_str()
        train_docs, val_docs = build_documents(chapters, cfg.chat_every, cfg.val_every,
                                               cfg.chat_reply_verses)
        train_stream = encode_stream(tok, train_docs)
        val_stream = encode_stream(tok, val_docs)
        if train_stream.numel() <= cfg.seq_len + 1:
            raise TrainError(f"seq_len {cfg.seq_len} is longer than the training stream")
        val_windows = _eval_windows(val_stream, cfg.seq_len, cfg.eval_batches * 4)
        say(f"corpus {len(text)} bytes, {len(chapters)} chapters; tokenizer vocab "
            f"{tok.get_vocab_size()}; train {train_stream.numel()} tokens, "
            f"val {val_stream.numel()} tokens")

        # model -----------------------------------------------------------------------------
        bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
        config = hf_config(cfg, bos_id, eos_id, pad_id)
        torch.manual_seed(cfg.seed)
        backend = make_backend(config, cfg.trainer)
        backend.load_hf_state(init_hf_state(config, cfg.init_std, cfg.seed))
        model = backend.module
        model.train()
        n_params = count_parameters(model)
        say(f"model: {n_params} parameters ({backend.name}); {cfg.steps} steps of "
            f"{cfg.batch_size}x{cfg.seq_len} tokens")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)

        data_gen = torch.Generator().manual_seed(cfg.seed)
        max_start = train_stream.numel() - cfg.seq_len - 1
        offsets = torch.arange(cfg.seq_len + 1)
        curve, window_losses = [], []
        t_train = time.perf_counter()
        for step in range(cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, max_start + 1, (cfg.batch_size,), generator=data_gen)
            batch = train_stream[starts[:, None] + offsets]
            loss = _loss(backend, batch)
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            window_losses.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                mean = sum(window_losses) / len(window_losses)
                curve.append({"step": step + 1, "train_loss": round(mean, 5), "lr": lr,
                              "elapsed_s": round(time.perf_counter() - t_train, 2)})
                window_losses = []
                say(f"step {step + 1:5d}  loss {mean:.4f}  lr {lr:.2e}  "
                    f"{time.perf_counter() - t_train:6.1f}s")
        train_seconds = time.perf_counter() - t_train
        val_loss = _evaluate(backend, val_windows)

        # checkpoint ------------------------------------------------------------------------
        save_dtype = getattr(torch, cfg.save_dtype)
        state = {k: v.detach().to(save_dtype).contiguous()
                 for k, v in sorted(backend.hf_state_dict().items())}
        if cfg.save_dtype != "float32":  # the validation loss of the weights as shipped
            backend.load_hf_state({k: v.float() for k, v in state.items()})
            val_loss_saved = _evaluate(backend, val_windows)
        else:
            val_loss_saved = val_loss

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "config.json", config)
        (out / "tokenizer.json").write_text(tok_json)
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.seq_len,
            "chat_template": CHAT_TEMPLATE,
        })
        _write_json(out / "generation_config.json", {
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "do_sample": True,
            "temperature": 0.8,
            "top_p": 0.95,
            "max_new_tokens": 128,
        })

        import tokenizers

        files = {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size}
                 for n in ARTIFACT_FILES}
        record = {
            "format": RECORD_FORMAT,
            "model_name": MODEL_NAME,
            "corpus": {
                "file": "services/inference_worker/builtin/corpus/kjv.txt",
                "sha256": sha256_bytes(text.encode("ascii")),
                "bytes": len(text),
                "source": "King James Version (1611), from Debian package bible-kjv-text 4.38 "
                          "(see corpus/README.md)",
                "license": "public domain",
                "chapters": len(chapters),
                "train_documents": len(train_docs),
                "val_documents": len(val_docs),
                "train_tokens": train_stream.numel(),
                "val_tokens": val_stream.numel(),
            },
            "tokenizer": {
                "type": "byte-level BPE (tokenizers)",
                "sha256": sha256_bytes(tok_json.encode()),
                "vocab_size": tok.get_vocab_size(),
                "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
                "chat_template": CHAT_TEMPLATE,
            },
            "hyperparameters": dataclasses.asdict(cfg),
            "seed": cfg.seed,
            "trainer": backend.name,
            "parameters": n_params,
            "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
            "loss_curve": curve,
            "final_train_loss": curve[-1]["train_loss"],
            "val_loss": round(val_loss, 5),
            "val_loss_saved_dtype": round(val_loss_saved, 5),
            "wall_time_s": {"train_loop": round(train_seconds, 2),
                            "total": round(time.perf_counter() - t_start, 2)},
            "cpu_time_s": round(time.process_time() - cpu_start, 2),
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "tokenizers": tokenizers.__version__,
                "transformers": _version("transformers"),
                "platform": platform.platform(),
                "machine": platform.machine(),
                "threads": cfg.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            },
            "code": {"train_py_sha256": sha256_file(Path(__file__)), **_git_commit()},
            "files": files,
            "reproducibility": (
                "Same seed + hyper-parameters + thread count + software versions on the same "
                "kind of CPU give bitwise-identical model.safetensors; the corpus, tokenizer.json "
                "and data order are identical everywhere. Other CPUs, thread counts or torch "
                "versions change floating-point reduction order, so weights differ in the last "
                "bits and losses agree only approximately. wall_time_s and elapsed_s never repeat."
            ),
        }
        _write_json(out / RECORD_NAME, record)
        say(f"val loss {val_loss:.4f} ({cfg.save_dtype}: {val_loss_saved:.4f}); wrote {out} "
            f"in {record['wall_time_s']['total']:.1f}s")
        return record
    finally:
        torch.set_num_threads(prev_threads)


def _short_omp_spin() -> None:
    """Let idle OpenMP threads spin only briefly before they sleep. It changes no result, but
    with libgomp's default spin a 2-thread run slows down 4-15x as soon as another process
    wants one of the two cores (measured here: 0.1 s/step alone; 0.4-1.9 s/step beside one busy
    process with the default, 0.22 s with GOMP_SPINCOUNT=1000, whose cost alone is within
    noise; OMP_WAIT_POLICY=PASSIVE is 0.18 s beside the busy process but 40% slower alone).
    libgomp reads the variable when torch is first imported, so this only takes effect if torch
    is not imported yet (as under ``strata train``); a value already set is kept."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# verification of an artifact directory against its record


def verify_artifact(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Check that every file listed in the record hashes to the recorded sha256; returns the
    record. Raises ``TrainError`` naming the first file that is missing or differs."""
    d = Path(model_dir)
    try:
        record = json.loads((d / RECORD_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{d / RECORD_NAME}: cannot read the training record: {e}") from e
    for name, meta in record.get("files", {}).items():
        path = d / name
        if not path.is_file():
            raise TrainError(f"{path}: listed in {RECORD_NAME} but missing")
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise TrainError(f"{path}: sha256 {digest} differs from the record's {meta['sha256']}")
    return record


def compare_weights(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict[str, Any]:
    """How far apart two checkpoints' weights are: identical bits, or the max abs difference."""
    from safetensors.torch import load_file

    a = load_file(str(Path(dir_a) / "model.safetensors"))
    b = load_file(str(Path(dir_b) / "model.safetensors"))
    if a.keys() != b.keys():
        return {"identical": False, "reason": "different tensor names",
                "only_a": sorted(a.keys() - b.keys()), "only_b": sorted(b.keys() - a.keys())}
    max_diff, differing = 0.0, []
    for k in sorted(a):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            return {"identical": False, "reason": f"{k}: shape/dtype differ"}
        if not (a[k] == b[k]).all():
            differing.append(k)
            max_diff = max(max_diff, (a[k].float() - b[k].float()).abs().max().item())
    return {"identical": not differing, "differing_tensors": len(differing),
            "max_abs_diff": max_diff}


# --------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str = "strata train") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train Strata's built-in model (a small Llama) on the bundled public-domain "
                    "King James Bible text and write an HF-format checkpoint with its training "
                    "record. The defaults reproduce the shipped model in under 2 minutes (about "
                    "80 s) on 2 CPU cores.")
    p.add_argument("--out", default=".strata/builtin-model",
                   help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a checkpoint already in --out")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; bitwise-identical weights are promised only for "
                        "the same value (%(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other hyper-parameter, e.g. --set lr=1e-3 "
                        f"(keys: {', '.join(f.name for f in dataclasses.fields(TrainConfig))})")
    p.add_argument("--compare", metavar="DIR", nargs="?", const=str(SHIPPED_MODEL_DIR),
                   help="after training, compare the weights with those in DIR (default: the "
                        "shipped model) and exit 1 if they differ")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    return p


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise TrainError(f"--set {pair!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(types)}")
        typ = types[key]
        try:
            if typ is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1", "yes")
            else:
                value = typ(raw)
        except ValueError:
            raise TrainError(f"--set {pair!r}: {raw!r} is not a valid {typ.__name__}") from None
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None, prog: str = "strata train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `strata train -- --steps 10` passes the separator through
        argv = argv[1:]
    args = build_parser(prog).parse_args(argv)
    try:
        overrides = _parse_overrides(args.set)
        for k in ("steps", "seed", "threads"):
            if k in overrides:
                raise TrainError(f"use --{k} instead of --set {k}=...")
        record = train(args.out, steps=args.steps, seed=args.seed, threads=args.threads,
                       overwrite=args.force, log=None if args.quiet else print, **overrides)
    except TrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {args.out}  (val loss {record['val_loss_saved_dtype']}, "
          f"{record['wall_time_s']['total']}s)")
    if args.compare:
        result = compare_weights(args.out, args.compare)
        if result.get("identical"):
            print(f"{prog}: weights are bitwise identical to {args.compare}")
        else:
            print(f"{prog}: weights differ from {args.compare}: {json.dumps(result)}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
