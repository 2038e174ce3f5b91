"""The GGUF writer's vocabulary: llama.cpp reads the token list by position, so token id N must be at
position N. A tokenizer whose ids have a gap, two tokens for one id, or an id past the embedding's
rows must be written by id (a gap padded) or refused, never shifted."""

from __future__ import annotations

import json

import pytest

gguf = pytest.importorskip("gguf")

from services.model_store.convert.hf_to_gguf import Unconvertible, write_llama_gguf  # noqa: E402
from tests.support.gguf_model import write_random_pair  # noqa: E402


def _tokens(path) -> list[str]:
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def _edit_tokenizer(ckpt, edit) -> dict:
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    edit(tok)
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    return tok


def test_a_vocabulary_with_a_gap_is_written_by_id(tmp_path):
    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=1)
    tok = _edit_tokenizer(ckpt, lambda t: t["model"]["vocab"].pop("&"))  # id 5 is unused
    out = write_llama_gguf(ckpt, tmp_path / "gap.gguf", "f16")
    tokens = _tokens(out)
    by_id = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    assert len(tokens) == json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert [t for t, i in by_id.items() if tokens[i] != t] == []  # every token at its id
    assert tokens[5] == "[PAD5]"


@pytest.mark.parametrize(
    "case, edit, expect",
    [
        (
            "two tokens for one id",
            lambda t: t["added_tokens"].append({"id": 5, "content": "<|x|>", "special": True}),
            "id 5",
        ),
        (
            "an id past the embedding",
            lambda t: t["added_tokens"].append({"id": 9999, "content": "<|x|>", "special": True}),
            "vocab_size",
        ),
    ],
)
def test_a_vocabulary_that_cannot_be_written_by_id_is_refused(tmp_path, case, edit, expect):
    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=1)
    _edit_tokenizer(ckpt, edit)
    with pytest.raises(Unconvertible, match=expect):
        write_llama_gguf(ckpt, tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("intermediate_size", 999),
        ("num_attention_heads", 3),
        ("vocab_size", 300),
        ("num_key_value_heads", 4),
        ("head_dim", 8),
    ],
)
def test_a_config_that_does_not_match_the_tensors_is_refused(tmp_path, key, value):
    """llama.cpp sizes its tensors from the GGUF's hyper-parameters and refuses a file whose tensors
    differ, at deploy time; the writer refuses it when it converts, naming the tensor and the setting."""
    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(
        Unconvertible, match=r"(has shape \(.*\), but config.json says \(|config.json: a head dimension of 21 is odd)"
    ):
        write_llama_gguf(ckpt, tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize(
    "file, content, expect",
    [
        ("tokenizer.json", "[]", "tokenizer.json: not a JSON object"),
        ("tokenizer.json", "[" * 100_000 + "]" * 100_000, "tokenizer.json: not a JSON object"),
        ("tokenizer.json", "{not json", "tokenizer.json: not valid JSON"),
        (
            "tokenizer.json",
            '{"model": ["BPE"], "pre_tokenizer": {"type": "ByteLevel"}}',
            "tokenizer.json: a list tokenizer",
        ),
        ("tokenizer_config.json", '"a string"', "tokenizer_config.json: not a JSON object"),
        ("config.json", '{"architectures": ["LlamaForCausalLM"]}', "config.json: num_attention_heads is missing"),
    ],
)
def test_a_malformed_checkpoint_is_a_clear_refusal(tmp_path, file, content, expect):
    """The checkpoint converted may be anyone's push: its JSON is refused with Unconvertible, not a traceback."""
    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=1)
    (ckpt / file).write_text(content)
    with pytest.raises(Unconvertible, match=expect):
        write_llama_gguf(ckpt, tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()
