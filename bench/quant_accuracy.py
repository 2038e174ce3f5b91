"""What weight-only quantization costs in accuracy, on the built-in model (issue #24): against the same
weights served in 16 bits (bf16, the checkpoint's dtype), over the held-out chapters (every 25th, which
training never saw):

* greedy agreement: prompts are a held-out chapter's heading and first verses; each engine continues
  greedily for ``--tokens`` tokens; reported as the share of continuations identical token for token,
  and the share of generated tokens before the first divergence;
* perplexity of the held-out chapters (windows of the model's context, each scored without a cache),
  and its change.

With ``--compile-decode`` the candidate's decode steps run compiled (engine/compiled_decode.py); with
``--quantize none`` too, that is the whole difference (perplexity is scored by prefill, which never runs
compiled, so only the agreement measures it).

Run: ``.venv/bin/python bench/quant_accuracy.py [--prompts 100 --tokens 16] [--quantize none] [--compile-decode]``."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from builtin_model import MODEL_DIR as MODEL  # noqa: E402
from builtin_model.config import BOS, EOS, TrainConfig  # noqa: E402
from builtin_model.data import load_corpus, split_chapters  # noqa: E402
from services.inference_worker.api import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def held_out() -> list[tuple[str, list[str]]]:
    every = TrainConfig().val_every
    return [c for i, c in enumerate(split_chapters(load_corpus())) if i % every == every - 1]


def perplexity(engine: LLMEngine, chapters) -> float:
    window = engine.max_model_len
    nll, count = 0.0, 0
    for heading, verses in chapters:
        ids = engine.tokenizer.encode(BOS + heading + "\n" + "\n".join(verses) + "\n" + EOS, add_special_tokens=False)
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start:start + window + 1])
            if len(chunk) < 2:
                continue
            logits = engine.ckpt.model.logits_without_cache(chunk[:-1])
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    return math.exp(nll / count)


def continuations(engine: LLMEngine, prompts: list[list[int]], n: int, rows: int | None = None) -> list[list[int]]:
    """Greedy continuations, ``rows`` prompts at a time (None: all together)."""
    rows = rows or len(prompts)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [o.token_ids for i in range(0, len(prompts), rows) for o in engine.generate(prompts[i:i + rows], params)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--quantize", default="int8", help="int8, int4 or none")
    ap.add_argument("--compile-decode", action="store_true", help="the candidate decodes through the compiled step")
    args = ap.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    name = (quantize or "bf16") + (" compiled" if args.compile_decode else "")
    chapters = held_out()
    base = LLMEngine.from_pretrained(MODEL, EngineConfig(device="cpu", dtype="bfloat16", num_blocks=512))
    quant = LLMEngine.from_pretrained(MODEL, EngineConfig(device="cpu", dtype="bfloat16", quantize=quantize,
                                                          num_blocks=512,
                                                          compile_decode="on" if args.compile_decode else "off"))
    # a chapter's heading and its first verses, cut after every 4th verse: several prompts per chapter
    texts = [BOS + h + "\n" + "\n".join(v[:j + 1]) + "\n" for h, v in chapters for j in range(0, len(v), 4)]
    prompts = [base.tokenizer.encode(t, add_special_tokens=False)[-(base.max_model_len - args.tokens):]
               for t in texts[:args.prompts]]
    # the compiled step serves small decode batches only (CompiledDecode.MAX_ROWS): one prompt at a time
    rows = 1 if args.compile_decode else None
    a, b = continuations(base, prompts, args.tokens, rows), continuations(quant, prompts, args.tokens, rows)
    same = sum(x == y for x, y in zip(a, b))
    prefix = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))
    ppl_base, ppl_quant = perplexity(base, chapters), perplexity(quant, chapters)
    print(
        f"load {os.getloadavg()[0]:.1f}; built-in model, {len(chapters)} held-out chapters, torch {torch.__version__}"
    )
    print(
        f"greedy agreement, {name} vs bf16: {same}/{len(prompts)} continuations identical "
        f"({args.tokens} tokens each); {prefix}/{len(prompts) * args.tokens} tokens "
        f"({100 * prefix / (len(prompts) * args.tokens):.1f} %) before the first divergence"
    )
    if args.compile_decode:
        print(f"decode steps run compiled: {quant.runner.decode_graph.steps}")
    print(
        f"held-out perplexity: bf16 {ppl_base:.3f}, {name} {ppl_quant:.3f} "
        f"({100 * (ppl_quant / ppl_base - 1):+.2f} %)"
    )


if __name__ == "__main__":
    main()
