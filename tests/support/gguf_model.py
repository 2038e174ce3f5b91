"""Write a GGUF file from a small HF Llama checkpoint (tests and bench: no model hub, no llama.cpp).

llama.cpp's own convert_hf_to_gguf.py refuses a tokenizer whose pre-tokenizer hash it does not know
(ours is trained in the test), and is not installed by the llama-cpp-python wheel. This does the
same for the one family the tests build: the Llama tensor names, the q/k row permutation that
llama.cpp's RoPE expects (HF stores rotate-half order), the hyper-parameters and a byte-level BPE
("gpt2") vocabulary with its merges, special tokens and chat template. The result is the same model
as the safetensors checkpoint, so both runtimes can be compared on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FTYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
SPECIAL = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(ckpt: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_llama_gguf(ckpt: Path, out: Path, ftype: str = "f32", *, chat_template: str | None = None,
                     name: str = "tiny-llama") -> Path:
    """The HF checkpoint directory ``ckpt`` (config.json, safetensors, tokenizer.json) as one GGUF."""
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text()) if (ckpt / "tokenizer_config.json").exists() else {}
    return _write(cfg, tok, tok_cfg, _tensors(ckpt), out, ftype, chat_template, name)


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table: 256 byte tokens, so any text tokenizes (one token per byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): i for i, c in enumerate(cs)}


def random_llama(*, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, context: int = 256, vocab_size: int | None = None,
                 dtype=np.float32) -> tuple[dict, dict, dict, dict[str, np.ndarray]]:
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
    tok = {"model": {"vocab": {k: v for k, v in vocab.items() if k not in SPECIAL}, "merges": [" ".join(m) for m in merges]},
           "added_tokens": [{"content": t, "id": vocab[t], "special": True} for t in SPECIAL]}
    tok_cfg = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=heads,
               num_key_value_heads=kv_heads, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
               max_position_embeddings=context, vocab_size=n_vocab, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=vocab["<|bos|>"], eos_token_id=vocab["<|eos|>"])
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (1.5 / np.sqrt(cols))).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.3 * rng.standard_normal(n, dtype=np.float32)).astype(dtype)

    hf = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, hidden), dtype=np.float32).astype(dtype),
          "model.norm.weight": norm(hidden), "lm_head.weight": mat(n_vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
                   p + "self_attn.q_proj.weight": mat(heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": mat(hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": mat(intermediate, hidden), p + "mlp.up_proj.weight": mat(intermediate, hidden),
                   p + "mlp.down_proj.weight": mat(hidden, intermediate)})
    return cfg, tok, tok_cfg, hf


def write_random_gguf(out: Path, ftype: str = "f32", *, chat_template: str | None = CHAT_TEMPLATE,
                      name: str = "tiny-llama", split_max_tensors: int = 0, **shape) -> Path:
    """A random-weight Llama (``random_llama``'s ``shape`` keywords) as one GGUF file."""
    cfg, tok, tok_cfg, hf = random_llama(**shape)
    return _write(cfg, tok, tok_cfg, hf, out, ftype, chat_template, name, split_max_tensors)


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
    return ckpt, {f: _write(cfg, tok, tok_cfg, hf, root / f"model.{f.upper()}.gguf", f, None, "tiny-llama") for f in ftypes}


def _hf_tokenizer_json(tok: dict) -> str:
    """The byte-level vocabulary as a ``tokenizers`` tokenizer.json (what the engine loads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE(vocab=tok["model"]["vocab"], merges=[tuple(m.split(" ")) for m in tok["model"]["merges"]]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(a["content"], special=True) for a in sorted(tok["added_tokens"], key=lambda a: a["id"])])
    return t.to_str()


def _write(cfg: dict, tok: dict, tok_cfg: dict, hf: dict[str, np.ndarray], out: Path, ftype: str,
           chat_template: str | None, name: str, split_max_tensors: int = 0) -> Path:
    """``split_max_tensors`` > 0: gguf-split's layout, OUT-0000N-of-0000M.gguf (``out`` is then a name prefix)."""
    import gguf

    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    w = gguf.GGUFWriter(str(out), "llama", split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_file_type(FTYPES[ftype])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    # the vocabulary in id order, as llama.cpp's "gpt2" (byte-level BPE) tokenizer reads it
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    for key, setter in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        value = tok_cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in vocab:
            setter(vocab[value])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    template = chat_template or tok_cfg.get("chat_template")
    if template:
        w.add_chat_template(template)
    def put(name: str, array: np.ndarray) -> None:
        # 1-d tensors (norms) stay f32, as llama.cpp's converter keeps them
        if array.ndim == 1 or ftype == "f32":
            w.add_tensor(name, np.ascontiguousarray(array.astype(np.float32)))
        elif ftype == "f16":
            w.add_tensor(name, np.ascontiguousarray(array.astype(np.float16)))
        else:  # Q8_0, quantized by the gguf package's own numpy reference
            q = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    put("token_embd.weight", hf["model.embed_tokens.weight"])
    put("output_norm.weight", hf["model.norm.weight"])
    if "lm_head.weight" in hf and not cfg.get("tie_word_embeddings"):
        put("output.weight", hf["lm_head.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(hf[p + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", _permute(hf[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
