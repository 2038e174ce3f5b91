"""Random-weight Llama models for tests and the bench (no model hub, no llama.cpp): as a safetensors
checkpoint and as GGUF files, written by the converter's own writer
(services/model_store/convert/hf_to_gguf.py), so both runtimes can be compared on the same model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.model_store.convert.hf_to_gguf import write_gguf, write_llama_gguf  # noqa: F401  (tests and the bench import it from here)

SPECIAL = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table: 256 byte tokens, so any text tokenizes (one token per byte)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): i for i, c in enumerate(cs)}


def random_llama(
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    context: int = 256,
    vocab_size: int | None = None,
    dtype=np.float32,
) -> tuple[dict, dict, dict, dict[str, np.ndarray]]:
    """A random-weight Llama with no transformers and no torch: (config.json, tokenizer.json,
    tokenizer_config.json, HF-named tensors). The vocabulary is byte-level BPE over the 256 bytes and
    the special tokens, padded with unused tokens to ``vocab_size``; weights keep activations O(1)."""
    vocab = _byte_vocab()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġ", "a")]  # a few, since llama.cpp refuses a BPE vocabulary without merges
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for t in SPECIAL:
        vocab[t] = len(vocab)
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"[PAD{i}]"] = i
    n_vocab = len(vocab)
    tok = {
        "model": {
            "vocab": {k: v for k, v in vocab.items() if k not in SPECIAL},
            "merges": [" ".join(m) for m in merges],
        },
        "added_tokens": [{"content": t, "id": vocab[t], "special": True} for t in SPECIAL],
    }
    tok_cfg = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        max_position_embeddings=context,
        vocab_size=n_vocab,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=vocab["<|bos|>"],
        eos_token_id=vocab["<|eos|>"],
    )
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (1.5 / np.sqrt(cols))).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.3 * rng.standard_normal(n, dtype=np.float32)).astype(dtype)

    hf = {
        "model.embed_tokens.weight": rng.standard_normal((n_vocab, hidden), dtype=np.float32).astype(dtype),
        "model.norm.weight": norm(hidden),
        "lm_head.weight": mat(n_vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        hf.update(
            {
                p + "input_layernorm.weight": norm(hidden),
                p + "post_attention_layernorm.weight": norm(hidden),
                p + "self_attn.q_proj.weight": mat(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": mat(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": mat(intermediate, hidden),
                p + "mlp.up_proj.weight": mat(intermediate, hidden),
                p + "mlp.down_proj.weight": mat(hidden, intermediate),
            }
        )
    return cfg, tok, tok_cfg, hf


def write_random_gguf(
    out: Path,
    ftype: str = "f32",
    *,
    chat_template: str | None = CHAT_TEMPLATE,
    name: str = "tiny-llama",
    split_max_tensors: int = 0,
    **shape,
) -> Path:
    """A random-weight Llama (``random_llama``'s ``shape`` keywords) as one GGUF file."""
    cfg, tok, tok_cfg, hf = random_llama(**shape)
    return write_gguf(cfg, tok, tok_cfg, hf, out, ftype, chat_template, name, split_max_tensors)


def write_random_pair(root: Path, ftypes: tuple[str, ...] = ("f16",), **shape) -> tuple[Path, dict[str, Path]]:
    """The same random-weight Llama as a safetensors checkpoint (``root/hf``, for the engine) and as
    GGUF files (``root/model.<FTYPE>.gguf``, for llama.cpp): (checkpoint directory, ftype -> GGUF)."""
    import json as _json

    from safetensors.numpy import save_file

    cfg, tok, tok_cfg, hf = random_llama(**shape)
    ckpt = root / "hf"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(_json.dumps(cfg))
    (ckpt / "tokenizer_config.json").write_text(_json.dumps(tok_cfg))
    (ckpt / "tokenizer.json").write_text(_hf_tokenizer_json(tok))
    return ckpt, {
        f: write_gguf(cfg, tok, tok_cfg, hf, root / f"model.{f.upper()}.gguf", f, None, "tiny-llama") for f in ftypes
    }


def _hf_tokenizer_json(tok: dict) -> str:
    """The byte-level vocabulary as a ``tokenizers`` tokenizer.json (what the engine loads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE(vocab=tok["model"]["vocab"], merges=[tuple(m.split(" ")) for m in tok["model"]["merges"]]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(
        [AddedToken(a["content"], special=True) for a in sorted(tok["added_tokens"], key=lambda a: a["id"])]
    )
    return t.to_str()
