"""Fixtures: tiny random-weight HF checkpoints (Llama, Qwen2, llama3-rope, tied, sharded) saved with
transformers, a tiny byte-level BPE tokenizer with a chat template, and engines over them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from services.inference_worker.engine import EngineConfig, LLMEngine  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache keeps keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join the running batch between steps.",
    "Once upon a time there was a small model that wanted to tell stories.",
    "It was the best of times, it was the worst of times.",
    "Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e and emoji \U0001F600 are bytes too.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "The engine streams tokens to a callback and stops at stop strings.",
]
SPECIAL = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small model that wanted to",
    "It was",
    "A paged KV cache keeps keys and values in fixed-size blocks. Continuous batching",
    "Call me Ishmael.",
]


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """The test models are tiny: a second OpenMP thread buys nothing and, on a busy 2-core box,
    its spin-waits make every op ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())


# family -> the transformers config and model classes a test checkpoint is made with
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
WINDOW = 24  # sliding window of the windowed test models: the long prompt is ~4 windows

# One small checkpoint per family, each exercising what sets its family apart.
FAMILY_SPECS = {
    "qwen3": dict(arch="qwen3", seed=11, head_dim=16),
    "gemma2": dict(arch="gemma2", seed=12, head_dim=16, num_hidden_layers=3, sliding_window=WINDOW,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
    "gemma3": dict(arch="gemma3", seed=13, head_dim=16, num_hidden_layers=3, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=16, rope_parameters={
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
    "phi3": dict(arch="phi3", seed=14, sliding_window=40, original_max_position_embeddings=32,
                 rope_scaling={"type": "longrope", "long_factor": [1.0 + i / 4 for i in range(6)],
                               "short_factor": [1.0 + i / 16 for i in range(6)]},
                 partial_rotary_factor=0.75),
    "olmo2": dict(arch="olmo2", seed=15),
    "granite": dict(arch="granite", seed=16, embedding_multiplier=6.0, residual_multiplier=0.5,
                    attention_multiplier=0.125, logits_scaling=2.0),
    "mixtral": dict(arch="mixtral", seed=17, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen3_moe": dict(arch="qwen3_moe", seed=18, head_dim=16, num_hidden_layers=3, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "mistral_swa": dict(arch="mistral", seed=19, head_dim=16, sliding_window=WINDOW),
}


@dataclass
class Ckpt:
    path: Path
    hf: torch.nn.Module  # the transformers model the files were saved from (fp32, eval)
    vocab: int
    eos: int


def randomize_(model: torch.nn.Module, eos: int, seed: int) -> None:
    """Weights with O(1) activations, non-trivial norms and biases, so bugs show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1])))
        # eos scores exactly 0 while ~vocab random logits compete: greedy never stops early, so
        # the 32-token comparisons really compare 32 tokens.
        model.get_output_embeddings().weight[eos].zero_()


def build_checkpoint(root: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0,
                     max_shard_size: str | None = None, **overrides) -> Ckpt:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab, bos, eos = tok.get_vocab_size(), tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    common.update(overrides)
    config_cls, cls = FAMILY_CLASSES[arch]
    config = getattr(transformers, config_cls)(**common)
    cls = getattr(transformers, cls)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_(model, eos, seed)
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos,
                                                            pad_token_id=eos)
    root.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(root, **kwargs)
    copy_tokenizer(tokenizer_dir, root)
    return Ckpt(root, model, vocab, eos)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer_dir):
    """Builds each named checkpoint once per session, on first use."""
    root = tmp_path_factory.mktemp("ckpts")
    specs = {
        "llama": dict(arch="llama", seed=1),
        "qwen2": dict(arch="qwen2", seed=2, num_hidden_layers=3),
        "llama3": dict(arch="llama", seed=3, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "tied": dict(arch="llama", seed=4, tie_word_embeddings=True, num_key_value_heads=4),
        "sharded": dict(arch="qwen2", seed=5, max_shard_size="40KB"),
        "mistral": dict(arch="mistral", seed=6, head_dim=32, sliding_window=None),
        **FAMILY_SPECS,
    }
    cache: dict[str, Ckpt] = {}

    def get(name: str) -> Ckpt:
        if name not in cache:
            cache[name] = build_checkpoint(root / name, tokenizer_dir, **specs[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def engines(ckpts):
    """Session-cached fp32 CPU engines with a generous cache, one per checkpoint name."""
    cache: dict[str, LLMEngine] = {}

    def get(name: str) -> LLMEngine:
        if name not in cache:
            cache[name] = LLMEngine.from_pretrained(
                ckpts(name).path, EngineConfig(device="cpu", dtype="float32", num_blocks=256,
                                               block_size=16))
        return cache[name]

    return get


def hf_greedy(hf, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
