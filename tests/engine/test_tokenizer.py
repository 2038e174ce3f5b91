"""Tokenizer wrapper: encoding, chat templates (checked against transformers), incremental
detokenization."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from services.inference_worker.engine import IncrementalDetokenizer, Tokenizer, TokenizerError

from .conftest import CORPUS

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Caf\u00e9?"}]


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def test_special_tokens_and_bos(tok):
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    ids = tok.encode("It was")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("It was", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "It was"  # special tokens skipped
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>It was"


def test_matches_transformers_encoding_and_chat_template(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    text = tok.apply_chat_template(MESSAGES)
    assert text.startswith("<|bos|><|system|>Be brief.<|eos|>") and text.endswith("<|assistant|>")
    ids = tok.encode_chat(MESSAGES)
    assert ids.count(tok.bos_token_id) == 1 and tok.decode(ids, False) == text


def test_template_from_separate_file_and_dict_tokens(tokenizer_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    cfg.pop("chat_template")
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|eos|>"}
    cfg["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(d)
    assert t.eos_token_id == 1 and t.encode("It")[0] != 0
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    (d / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer.from_dir(d).apply_chat_template(MESSAGES)


def test_template_raise_exception_surfaces(tokenizer_dir, tmp_path):
    import jinja2

    d = tmp_path / "t"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        Tokenizer.from_dir(d).apply_chat_template(MESSAGES)


def stream(tok, prompt_ids, ids):
    d = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return deltas, d.text


def test_incremental_detokenization_equals_full_decode(tok):
    rng = random.Random(0)
    prompt = tok.encode("Once upon a time")
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas, full = stream(tok, prompt, ids)
        assert "".join(deltas) == full == tok.decode(ids) == text
    for _ in range(20):  # random ids: invalid UTF-8 becomes U+FFFD, but the sum still matches
        ids = [rng.randrange(2, tok.vocab_size) for _ in range(30)]
        deltas, full = stream(tok, prompt, ids)
        assert full == tok.decode(ids)


def test_multibyte_characters_are_never_split(tok):
    text = "\u65e5\u672c\u8a9e \U0001F600!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters span several byte tokens
    deltas, full = stream(tok, [], ids)
    assert full == text and not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # held back while a character was incomplete


def test_sentencepiece_style_stream_keeps_the_leading_space():
    """Llama 2 / Mistral tokenizers (Metaspace + byte fallback) drop a leading space when a piece
    is decoded alone; the stream must read as the continuation of the prompt."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    raw.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    tok = Tokenizer(raw, bos_token="<s>", eos_token="</s>", add_bos_token=True)
    prompt = tok.encode("Once upon a time")
    assert prompt[0] == tok.bos_token_id
    for text in CORPUS:
        out = tok.encode(" " + text, add_special_tokens=False)
        deltas, streamed = stream(tok, prompt, out)
        assert streamed == " " + text == tok.decode(prompt + out)[len(tok.decode(prompt)):]
        assert not any("\ufffd" in d for d in deltas)
