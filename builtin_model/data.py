"""The corpus, its tokenizer, the chat template and the token stream the model trains on."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from .config import BOS, CHAT_TEMPLATE, CORPUS_PATH, CORPUS_SHA256, EOS, SPECIAL_TOKENS, TrainError


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
