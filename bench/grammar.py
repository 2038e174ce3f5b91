"""What grammar-constrained decoding costs per token: the engine's decode step with a JSON-schema
constraint on every row, next to the same step unconstrained, in the same run, at batch 1 and 32;
and the raw operation (llguidance's masks for the batch, unpacked and applied to the logits) alone.

    python bench/grammar.py                  # random-weight Llama, 32000-token byte-level BPE
    python bench/grammar.py --rounds 6 --batch-sizes 1,8,32

The tokenizer is a byte-level BPE trained on this machine's Python standard library sources, so its
vocabulary looks like a real one to the grammar (a word-level toy vocabulary would flatter the mask).
The schema's one string field cannot close before --new-tokens, so every row decodes the same number
of tokens under the mask. Rounds alternate constrained and free runs; the median of each is printed
with the load average, since the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.host import loadavg  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["summary"],
          "properties": {"summary": {"type": "string", "minLength": 5000}}}


def train_tokenizer(vocab: int, out: Path, max_files: int | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(errors="replace") for p in sources), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def make_checkpoint(args, root: Path) -> Path:
    import transformers

    path = root / "grammar-bench"
    train_tokenizer(args.vocab, root, args.max_files)
    vocab = json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab) + 2,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((root / name).read_bytes())
    return path


def decode_ms_per_step(engine, batch: int, new_tokens: int, constrained: bool) -> float:
    """Wall time per decode step (the prefill's step left out) for ``batch`` rows of ``new_tokens``."""
    from services.inference_worker.api import Constraint, SamplingParams

    constraint = Constraint("json_schema", json.dumps(SCHEMA)) if constrained else None
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True, constraint=constraint)
    for i in range(batch):
        engine.add_request(f"def f{i}(x):", params)
    engine.step()  # the prefill of the whole batch
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) * 1e3 / max(steps, 1)


def mask_ms(engine, batch: int, tokens: int) -> float:
    """The raw operation: llguidance's mask for every row, unpacked, applied to [batch, V] logits."""
    from services.inference_worker.api import Constraint
    from services.inference_worker.engine.guided import allowed_tokens

    matchers = [engine.compile(Constraint("json_schema", json.dumps(SCHEMA))) for _ in range(batch)]
    V = engine.model_config.vocab_size
    logits = torch.randn(batch, V)
    prefix = engine.tokenizer.encode('{"summary": "', add_special_tokens=False)
    for m in matchers:
        assert m.consume_tokens(prefix), m.get_error()
    letter = engine.tokenizer.token_to_id("a")
    t0 = time.perf_counter()
    for _ in range(tokens):
        allowed = allowed_tokens(matchers, V, logits.device)
        logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        for m in matchers:
            m.consume_token(letter)
    return (time.perf_counter() - t0) * 1e3 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-files", type=int, default=None, help="train the tokenizer on the first N stdlib files only")
    args = ap.parse_args()
    from services.inference_worker.api import Constraint, EngineConfig, LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = make_checkpoint(args, Path(tmp))
        print(
            f"checkpoint: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers "
            f"(tokenizer trained in {time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}"
        )
        engine = LLMEngine.from_pretrained(
            path, EngineConfig(device="cpu", dtype="float32", max_num_seqs=64, kv_cache_bytes=256 << 20)
        )
        t0 = time.perf_counter()
        engine.compile(Constraint("json_schema", json.dumps(SCHEMA)))
        print(f"first compile of the schema (tokenizer view + grammar): {(time.perf_counter() - t0) * 1e3:.0f} ms")
        print(f"load average before: {loadavg()}")
        print(
            f"{'batch':>5} {'free ms/step':>13} {'guided ms/step':>15} {'overhead':>9} "
            f"{'mask alone ms':>14} {'mask us/row':>12}"
        )
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            free, guided, raw = [], [], []
            decode_ms_per_step(engine, batch, 4, False)  # warm-up
            for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both
                free.append(decode_ms_per_step(engine, batch, args.new_tokens, False))
                guided.append(decode_ms_per_step(engine, batch, args.new_tokens, True))
                raw.append(mask_ms(engine, batch, args.new_tokens))
            f, g, r = (statistics.median(x) for x in (free, guided, raw))
            print(f"{batch:>5} {f:>13.2f} {g:>15.2f} {g / f - 1:>8.0%} {r:>14.2f} {r * 1e3 / batch:>12.0f}")
        print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
