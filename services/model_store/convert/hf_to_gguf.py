"""A Hugging Face Llama checkpoint (config.json, *.safetensors, a byte-level BPE tokenizer.json) as one
GGUF file, with no llama.cpp: what `strata model convert --to gguf` runs before llama.cpp's quantizer.

llama.cpp's own convert_hf_to_gguf.py is not installed with the llama-cpp-python wheel and refuses a
tokenizer whose pre-tokenizer hash it does not know. This writes the one family it has tests for: the
Llama tensor names, the q/k row permutation that llama.cpp's RoPE expects (HF stores rotate-half
order), the hyper-parameters, and a GPT-2-style byte-level BPE vocabulary with its merges, special
tokens and chat template. Anything else (another architecture, rope scaling, biases, a SentencePiece
or differently pre-tokenized vocabulary, a tensor it does not know) is refused with ``Unconvertible``
rather than written wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np

from shared.errors import Invalid
from services.model_store.domain.checks import json_object

FTYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
ARCHITECTURES = ("LlamaForCausalLM",)


class Unconvertible(Invalid):
    """A checkpoint this writer would not convert faithfully."""


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(ckpt: Path) -> _Tensors:
    """The checkpoint's tensors, each read from its safetensors file when the writer asks for it."""
    from safetensors import safe_open

    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            loaders.update({key: partial(_load, f, key) for key in st.keys()})
    return _Tensors(loaders)


def _load(file: Path, key: str) -> np.ndarray:
    """One tensor as numpy (BF16, which numpy lacks, through torch as float32)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as st:
        t = st.get_tensor(key)
    return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file (anyone's push): an object, or Unconvertible saying why not."""
    try:
        return json_object(path.read_bytes())
    except ValueError as exc:
        raise Unconvertible(f"{path.name}: {exc}") from None


def check_convertible(cfg: dict, tok: dict) -> None:
    """Refuse what ``_write`` would get wrong: only the Llama family with a GPT-2 byte-level BPE tokenizer."""
    for key in (
        "num_attention_heads",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
    ):
        value = cfg.get(key)
        if value is None:
            raise Unconvertible(f"config.json: {key} is missing; the GGUF conversion writes it")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise Unconvertible(f"config.json: {key}={value!r} is not a positive integer")
    for key in ("num_key_value_heads", "head_dim"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise Unconvertible(f"config.json: {key}={value!r} is not a positive integer")
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise Unconvertible(
            f"config.json: architecture {arch} cannot be converted to GGUF here (only {', '.join(ARCHITECTURES)})"
        )
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise Unconvertible(
                f"config.json: {key}={cfg[key]!r} is not supported by the GGUF conversion (plain Llama only)"
            )
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if not isinstance(model, dict):
        raise Unconvertible(
            f"tokenizer.json: a {type(model).__name__} tokenizer model; only byte-level BPE is converted"
        )
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise Unconvertible(f"tokenizer.json: a {model.get('type')} tokenizer; only byte-level BPE is converted")
    merges, added = model.get("merges", []), tok.get("added_tokens", [])
    if not isinstance(merges, list) or not all(
        isinstance(m, str) or (isinstance(m, list) and all(isinstance(x, str) for x in m)) for m in merges
    ):
        raise Unconvertible("tokenizer.json: model.merges is not a list of merges (\"a b\" or [\"a\", \"b\"])")
    if not isinstance(added, list) or not all(isinstance(a, dict) and isinstance(a.get("content"), str) for a in added):
        raise Unconvertible("tokenizer.json: added_tokens is not a list of tokens with a content and an id")
    if (
        not isinstance(pre, dict)
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        raise Unconvertible(
            "tokenizer.json: the pre-tokenizer is not GPT-2's byte-level split (ByteLevel, use_regex, "
            f"no prefix space) but {json.dumps(pre)[:200]}; llama.cpp would tokenize it differently"
        )


def write_llama_gguf(
    ckpt: Path, out: Path, ftype: str = "f32", *, chat_template: str | None = None, name: str = "tiny-llama"
) -> Path:
    """The HF checkpoint directory ``ckpt`` (config.json, safetensors, tokenizer.json) as one GGUF."""
    for required in ("config.json", "tokenizer.json"):
        if not (ckpt / required).is_file():
            raise Unconvertible(f"{required}: missing; the GGUF conversion needs the config and a tokenizer.json")
    cfg, tok = _json_object(ckpt / "config.json"), _json_object(ckpt / "tokenizer.json")
    check_convertible(cfg, tok)
    tok_cfg = _json_object(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").exists() else {}
    return write_gguf(cfg, tok, tok_cfg, _tensors(ckpt), out, ftype, chat_template, name)


def write_gguf(
    cfg: dict,
    tok: dict,
    tok_cfg: dict,
    hf: Mapping[str, np.ndarray],
    out: Path,
    ftype: str,
    chat_template: str | None,
    name: str,
    split_max_tensors: int = 0,
) -> Path:
    """``split_max_tensors`` > 0: gguf-split's layout, OUT-0000N-of-0000M.gguf (``out`` is then a name prefix)."""
    import gguf

    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    vocab, tokens = _vocabulary(tok, cfg["vocab_size"])
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
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
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(
        [
            gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL if t in vocab else gguf.TokenType.UNUSED
            for t in tokens
        ]
    )
    w.add_token_merges(merges)
    for key, setter in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        value = tok_cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in vocab:
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

    hf = _Tensors.of(hf)
    vocab_size, ffn, q_rows, kv_rows = cfg["vocab_size"], cfg["intermediate_size"], n_head * head_dim, n_kv * head_dim

    def get(key: str, *shape: int) -> np.ndarray:
        """``key``, whose shape must be what the hyper-parameters written above make llama.cpp expect."""
        array = hf[key]
        if tuple(array.shape) != shape:
            raise Unconvertible(
                f"tensor {key} has shape {tuple(array.shape)}, but config.json says {shape} (vocab_size "
                f"{vocab_size}, hidden_size {hidden}, intermediate_size {ffn}, {n_head} heads, {n_kv} "
                f"key/value heads of {head_dim}); llama.cpp would refuse the GGUF"
            )
        return array

    if head_dim % 2:
        raise Unconvertible(f"config.json: a head dimension of {head_dim} is odd; RoPE rotates pairs")
    try:
        put("token_embd.weight", get("model.embed_tokens.weight", vocab_size, hidden))
        put("output_norm.weight", get("model.norm.weight", hidden))
        if "lm_head.weight" in hf and not cfg.get("tie_word_embeddings"):
            put("output.weight", get("lm_head.weight", vocab_size, hidden))
        for i in range(layers):
            p = f"model.layers.{i}."
            put(f"blk.{i}.attn_norm.weight", get(p + "input_layernorm.weight", hidden))
            put(f"blk.{i}.attn_q.weight", _permute(get(p + "self_attn.q_proj.weight", q_rows, hidden), n_head))
            put(f"blk.{i}.attn_k.weight", _permute(get(p + "self_attn.k_proj.weight", kv_rows, hidden), n_kv))
            put(f"blk.{i}.attn_v.weight", get(p + "self_attn.v_proj.weight", kv_rows, hidden))
            put(f"blk.{i}.attn_output.weight", get(p + "self_attn.o_proj.weight", hidden, q_rows))
            put(f"blk.{i}.ffn_norm.weight", get(p + "post_attention_layernorm.weight", hidden))
            put(f"blk.{i}.ffn_gate.weight", get(p + "mlp.gate_proj.weight", ffn, hidden))
            put(f"blk.{i}.ffn_up.weight", get(p + "mlp.up_proj.weight", ffn, hidden))
            put(f"blk.{i}.ffn_down.weight", get(p + "mlp.down_proj.weight", hidden, ffn))
    except Unconvertible:
        out.unlink(missing_ok=True)
        raise
    left = sorted(set(hf) - hf.read - ({"lm_head.weight"} if cfg.get("tie_word_embeddings") else set()))
    if left:
        w.close()
        out.unlink(missing_ok=True)
        raise Unconvertible(
            f"tensors the Llama conversion does not know: {', '.join(left[:5])}{' …' if len(left) > 5 else ''}"
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _vocabulary(tok: dict, vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """(token -> id, the tokens in id order) as llama.cpp's "gpt2" tokenizer reads them: by position, so
    each token is at its id, an unused id is a [PAD<id>] (as llama.cpp's converter writes it), and two
    tokens for one id or an id past the embedding's ``vocab_size`` rows are refused, not shifted."""
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added.get("id")
    by_id: dict[int, str] = {}
    for token, id_ in vocab.items():
        if not isinstance(id_, int) or isinstance(id_, bool) or not 0 <= id_ < vocab_size:
            raise Unconvertible(
                f"tokenizer.json: token {token[:40]!r} has id {id_!r}, outside config.json's vocab_size {vocab_size}"
            )
        if id_ in by_id:
            raise Unconvertible(f"tokenizer.json: tokens {by_id[id_][:40]!r} and {token[:40]!r} both have id {id_}")
        by_id[id_] = token
    return vocab, [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]


class _Tensors(Mapping):
    """Tensors by HF name, loaded on access (the writer keeps the F16 copies; one F32 tensor at a time is
    in memory besides), remembering which were read: one left unread is a tensor the writer does not know."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]) -> None:
        self.loaders = loaders
        self.read: set[str] = set()

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> _Tensors:
        return tensors if isinstance(tensors, _Tensors) else cls({k: partial(tensors.__getitem__, k) for k in tensors})

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.loaders:
            raise Unconvertible(f"tensor {key} is missing from the checkpoint's safetensors files")
        self.read.add(key)
        return self.loaders[key]()

    def __contains__(self, key: object) -> bool:
        return key in self.loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)
