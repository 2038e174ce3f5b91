"""A GGUF model's vocabulary behind the engine's Tokenizer: llama.cpp tokenizes and detokenizes, and
the engine's Tokenizer (chat templates rendered with the same sandboxed jinja2, BOS handling) and
IncrementalDetokenizer (stop strings, streaming deltas) work unchanged on top of it. So a chat
request renders and streams the same way on both runtimes."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as C

from services.inference_worker.engine import Tokenizer


@dataclass
class _Encoding:
    ids: list[int]


class LlamaVocab:
    """The slice of the ``tokenizers.Tokenizer`` API that engine/tokenizer.py calls, over llama_vocab."""

    def __init__(self, vocab) -> None:  # a llama_vocab_p, valid while its model is loaded
        self.vocab = vocab
        self.n_tokens = C.llama_vocab_n_tokens(vocab)
        self._ids = {self._text(i): i for i in range(self.n_tokens)}

    def _text(self, token: int) -> str:
        raw = C.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.n_tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        # special-token text in a rendered chat template becomes the special token, as the HF
        # tokenizers library does for added tokens; BOS is the engine Tokenizer's business
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, True)
        if n < 0:  # more tokens than bytes cannot happen with byte fallback, but the API says to retry
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, True)
        return _Encoding(list(buf[:n]))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if not ids:
            return ""
        arr = (C.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 16
        out = ctypes.create_string_buffer(cap)
        n = C.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, not skip_special_tokens)
        if n < 0:
            cap = -n
            out = ctypes.create_string_buffer(cap)
            n = C.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, not skip_special_tokens)
        # a partial UTF-8 character becomes U+FFFD, which the IncrementalDetokenizer holds back
        return out.raw[:n].decode("utf-8", errors="replace")

    def to_str(self) -> str:
        raise NotImplementedError("a GGUF vocabulary has no tokenizer.json")


def tokenizer_for(model, source: str) -> Tokenizer:
    """The engine's Tokenizer over a loaded llama.cpp model's vocabulary and GGUF chat template."""
    vocab = LlamaVocab(C.llama_model_get_vocab(model))
    bos, eos = C.llama_vocab_bos(vocab.vocab), C.llama_vocab_eos(vocab.vocab)
    template = C.llama_model_chat_template(model, None)
    return Tokenizer(vocab, bos_token=vocab._text(bos) if bos >= 0 else None,
                     eos_token=vocab._text(eos) if eos >= 0 else None,
                     add_bos_token=bool(C.llama_vocab_get_add_bos(vocab.vocab)),
                     chat_template=template.decode("utf-8") if template else None, source=source)
