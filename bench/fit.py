"""Fit-model check: hardware-inventory's predicted memory next to what the engine really allocates.

    python bench/fit.py --checkpoint DIR [--context 4096] [--batch 1]      # any HF Llama-family checkpoint
    python bench/fit.py --make llama3-8b --root /data/bench                # writes a zero-weight Llama-3-8B-shaped
                                                                           # checkpoint (16 GB) there, then measures it
    python bench/fit.py --checkpoint DIR --contexts 1024,4096,8192 --batches 1,8

For each (context, batch) the engine is loaded fresh with its KV cache sized to exactly context x
batch tokens (what a deploy.scheduled asks the worker for), warmed up with ``batch`` prompts of
``context - 8`` tokens each (the largest prefill the engine does, chunked at 4096 tokens per step), then
the peak is read: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS (VmHWM) minus
its RSS before loading on CPU. The prediction is ``services.hardware_inventory.domain.fit.predict``
(the formula alone, before any learned correction). The issue's target: |error| <= 10 % on the GPU box.
Prints one table row per setting and, with --json, the rows as JSON for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from services.hardware_inventory.api import dtype_name, predict
from shared.inventory import ModelShape

SHAPES = {  # name -> config.json fields
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False),
}
SAFETENSORS_DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I8": 1, "U8": 1}


def shape_of(path: Path) -> ModelShape:
    """What model-store's ModelMetadata would say about a checkpoint: config.json + safetensors headers."""
    cfg = json.loads((path / "config.json").read_text())
    by_dtype: dict[str, int] = {}
    params = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + n * SAFETENSORS_DTYPES[t["dtype"]]
    heads = cfg["num_attention_heads"]
    return ModelShape(
        architecture=cfg["architectures"][0],
        dtype=dtype_name(max(by_dtype, key=by_dtype.get)),
        parameters=params,
        weight_bytes=sum(by_dtype.values()),
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        context_length=cfg["max_position_embeddings"],
    )


def make_checkpoint(name: str, root: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A zero-weight checkpoint of a known shape, written tensor by tensor (no 2x RAM), plus a tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **SHAPES[name],
    }
    path = root / f"fit-{name}"
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    save_file(
        {"model.embed_tokens.weight": z(v, h), "model.norm.weight": z(h), "lm_head.weight": z(v, h)},
        str(path / "model-00000.safetensors"),
    )
    for layer in range(n):
        p = f"model.layers.{layer}."
        save_file(
            {
                p + "input_layernorm.weight": z(h),
                p + "post_attention_layernorm.weight": z(h),
                p + "self_attn.q_proj.weight": z(h, h),
                p + "self_attn.k_proj.weight": z(kv, h),
                p + "self_attn.v_proj.weight": z(kv, h),
                p + "self_attn.o_proj.weight": z(h, h),
                p + "mlp.gate_proj.weight": z(i, h),
                p + "mlp.up_proj.weight": z(i, h),
                p + "mlp.down_proj.weight": z(h, i),
            },
            str(path / f"model-{layer + 1:05d}.safetensors"),
        )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{k}": k for k in range(3, v)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(path: Path, device: str, dtype: str | None, context: int, batch: int) -> dict:
    from services.inference_worker.api import EngineConfig, LLMEngine, SamplingParams

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes("VmRSS")
    blocks = batch * -(-context // 16)
    engine = LLMEngine.from_pretrained(
        path,
        EngineConfig(
            device=device,
            dtype=dtype,
            num_blocks=blocks,
            block_size=16,
            max_num_seqs=batch,
            max_num_batched_tokens=4096,
            max_model_len=context,
        ),
    )
    vocab = engine.ckpt.config.vocab_size
    prompts = [[3 + (k * 7919 + j) % (vocab - 3) for j in range(context - 8)] for k in range(batch)]
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = (
            rss_bytes("VmHWM") - before
        )  # the high-water mark includes whatever ran before: measure one setting per process on CPU
    measured = {
        "weights": engine.weights_bytes,
        "kv_cache": engine.cache_usage().num_blocks * engine.cache_usage().bytes_per_block,
        "peak": peak,
        "dtype": str(engine.dtype).removeprefix("torch."),
    }
    del engine
    gc.collect()
    return measured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--make", choices=sorted(SHAPES), help="write a zero-weight checkpoint of this shape under --root")
    ap.add_argument("--root", type=Path, default=Path("/tmp/strata-bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", help="compute dtype (default: checkpoint's on CUDA, float32 on CPU)")
    ap.add_argument("--contexts", default="4096", help="comma-separated context lengths")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.checkpoint and not args.make:
        ap.error("give --checkpoint DIR or --make SHAPE")
    path = args.checkpoint or make_checkpoint(args.make, args.root)
    shape = shape_of(path)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    card = torch.cuda.get_device_name() if kind == "cuda" else platform.processor() or platform.machine()
    print(
        f"# {path.name}: {shape.architecture}, {shape.parameters / 1e9:.3f} B params, {shape.dtype}, on {card}; "
        f"torch {torch.__version__}"
    )
    print(
        f"{'context':>8} {'batch':>5} {'pred weights':>13} {'pred KV':>10} {'pred act+ws':>12} {'predicted':>11} "
        f"{'meas weights':>13} {'meas KV':>10} {'measured peak':>14} {'error':>8}"
    )
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            est = predict(shape, kind, context_length=min(context, shape.context_length), batch=batch, dtype=args.dtype)
            m = measure(path, args.device, args.dtype, est.context_length, batch)
            error = (est.total - m["peak"]) / m["peak"]
            rows.append(
                {
                    "checkpoint": path.name,
                    "device": card,
                    "context": est.context_length,
                    "batch": batch,
                    "predicted": est.total,
                    "predicted_terms": est.model_dump(),
                    "measured": m,
                    "error": error,
                }
            )
            print(
                f"{est.context_length:>8} {batch:>5} {est.weights / 1e9:>10.3f} GB {est.kv_cache / 1e9:>7.3f} GB "
                f"{(est.activations + est.workspace) / 1e9:>9.3f} GB {est.total / 1e9:>8.3f} GB "
                f"{m['weights'] / 1e9:>10.3f} GB "
                f"{m['kv_cache'] / 1e9:>7.3f} GB {m['peak'] / 1e9:>11.3f} GB {100 * error:>+7.1f}%",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {100 * worst:.1f}% (target <= 10% on the GPU box)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
