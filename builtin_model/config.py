"""The built-in model's constants and the run configuration (every knob, validated)."""

from __future__ import annotations

from dataclasses import dataclass

from . import CORPUS_DIR

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



TRAINERS = ("auto", "engine", "transformers")
