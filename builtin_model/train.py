"""Train Strata's built-in model: a small Llama on the bundled King James Bible text.

``train(out_dir)`` (and ``main(argv)``, which ``strata train`` calls) does, in one process:

1. reads ``corpus/kjv.txt`` and checks its sha256 against ``CORPUS_SHA256``;
2. trains a byte-level BPE tokenizer on it (``tokenizers``) with chat special tokens;
3. turns the corpus into one token stream of documents: every chapter as plain text between
   ``<|bos|>`` and ``<|eos|>``, plus every ``chat_every``-th chapter a second time rendered
   through the chat template as a user/assistant conversation (so that a chat prompt is
   something the model has seen and it learns to end a reply with ``<|eos|>``);
   every ``val_every``-th chapter is held out for the validation loss;
4. trains a Llama-architecture decoder with AdamW on random windows of that stream (fixed
   seed, fixed data order, fixed thread count);
5. writes an HF-format checkpoint (``config.json``, ``model.safetensors`` with HF tensor names,
   ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
   ``generation_config.json``) and ``training_record.json`` next to it.

Reproducibility: with the same seed, hyper-parameters, thread count and software versions on
the same kind of CPU, a run gives bitwise-identical weights (tests check this on short runs).
Across CPUs, thread counts or torch versions the floating-point reductions differ, so the
weights differ in the last bits and the loss curve agrees only approximately; the corpus, the
tokenizer and the data order are the same everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import BUILTIN_DIR as HERE
from . import MODEL_NAME
from . import MODEL_DIR as SHIPPED_MODEL_DIR
from .artifact import compare_weights
from .checkpoint import _Backend, count_parameters, hf_config, init_hf_state, make_backend
from .config import (
    ARTIFACT_FILES,
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    RECORD_FORMAT,
    RECORD_NAME,
    SPECIAL_TOKENS,
    SYSTEM,
    TrainConfig,
    TrainError,
    USER,
)
from .data import (
    build_documents,
    encode_stream,
    load_corpus,
    sha256_bytes,
    sha256_file,
    split_chapters,
    train_tokenizer,
)

# --------------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _eval_windows(stream, seq_len: int, n: int):
    import torch

    usable = stream.numel() - seq_len - 1
    if usable <= 0:
        raise TrainError(f"the validation split ({stream.numel()} tokens) is shorter than seq_len {seq_len}")
    starts = torch.linspace(0, usable, n).long()
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def _loss(backend: _Backend, batch):
    import torch.nn.functional as F

    logits = backend.logits(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def _evaluate(backend: _Backend, windows, chunk: int = 8) -> float:
    import torch

    backend.module.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.size(0), chunk):
            part = windows[i : i + chunk]
            total += _loss(backend, part).item() * part.size(0)
    backend.module.train()
    return total / windows.size(0)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not overwrite:
        clash = [n for n in (*ARTIFACT_FILES, RECORD_NAME) if (out_dir / n).exists()]
        if clash:
            raise TrainError(
                f"output directory {out_dir} already holds a checkpoint "
                f"({', '.join(clash)}); pass overwrite=True (--force) to replace it"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainError(f"output directory {out_dir} is not writable: {e}") from e


def trainer_digest() -> str:
    """sha256 over the trainer's source files (this package's modules), name and content each."""
    parts = [f"{path.name}\n{path.read_text()}" for path in sorted(HERE.glob("*.py"))]
    return sha256_bytes("\0".join(parts).encode())


def _git_commit() -> dict[str, Any]:
    try:
        root = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(HERE)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"git_commit": commit, "builtin_dir_dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "builtin_dir_dirty": None}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def train(
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the built-in model and write the checkpoint + ``training_record.json`` to
    ``out_dir``. Keyword overrides are ``TrainConfig`` fields. Returns the record."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TrainError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if steps is not None:
        overrides["steps"] = steps
    if seed is not None:
        overrides["seed"] = seed
    cfg = TrainConfig(**overrides)
    cfg.validate()
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    say = log or (lambda _msg: None)

    _short_omp_spin()
    import torch
    from safetensors.torch import save_file

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # data ------------------------------------------------------------------------------
        text = load_corpus()
        chapters = split_chapters(text)
        tok = train_tokenizer(text, cfg.vocab_size)
        tok_json = tok.to_str()
        train_docs, val_docs = build_documents(chapters, cfg.chat_every, cfg.val_every, cfg.chat_reply_verses)
        train_stream = encode_stream(tok, train_docs)
        val_stream = encode_stream(tok, val_docs)
        if train_stream.numel() <= cfg.seq_len + 1:
            raise TrainError(f"seq_len {cfg.seq_len} is longer than the training stream")
        val_windows = _eval_windows(val_stream, cfg.seq_len, cfg.eval_batches * 4)
        say(
            f"corpus {len(text)} bytes, {len(chapters)} chapters; tokenizer vocab "
            f"{tok.get_vocab_size()}; train {train_stream.numel()} tokens, "
            f"val {val_stream.numel()} tokens"
        )

        # model -----------------------------------------------------------------------------
        bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
        config = hf_config(cfg, bos_id, eos_id, pad_id)
        torch.manual_seed(cfg.seed)
        backend = make_backend(config, cfg.trainer)
        backend.load_hf_state(init_hf_state(config, cfg.init_std, cfg.seed))
        model = backend.module
        model.train()
        n_params = count_parameters(model)
        say(
            f"model: {n_params} parameters ({backend.name}); {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens"
        )

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=1e-8,
            foreach=False,
        )

        data_gen = torch.Generator().manual_seed(cfg.seed)
        max_start = train_stream.numel() - cfg.seq_len - 1
        offsets = torch.arange(cfg.seq_len + 1)
        curve, window_losses = [], []
        t_train = time.perf_counter()
        for step in range(cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, max_start + 1, (cfg.batch_size,), generator=data_gen)
            batch = train_stream[starts[:, None] + offsets]
            loss = _loss(backend, batch)
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            window_losses.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                mean = sum(window_losses) / len(window_losses)
                curve.append(
                    {
                        "step": step + 1,
                        "train_loss": round(mean, 5),
                        "lr": lr,
                        "elapsed_s": round(time.perf_counter() - t_train, 2),
                    }
                )
                window_losses = []
                say(f"step {step + 1:5d}  loss {mean:.4f}  lr {lr:.2e}  {time.perf_counter() - t_train:6.1f}s")
        train_seconds = time.perf_counter() - t_train
        val_loss = _evaluate(backend, val_windows)

        # checkpoint ------------------------------------------------------------------------
        save_dtype = getattr(torch, cfg.save_dtype)
        state = {k: v.detach().to(save_dtype).contiguous() for k, v in sorted(backend.hf_state_dict().items())}
        if cfg.save_dtype != "float32":  # the validation loss of the weights as shipped
            backend.load_hf_state({k: v.float() for k, v in state.items()})
            val_loss_saved = _evaluate(backend, val_windows)
        else:
            val_loss_saved = val_loss

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "config.json", config)
        (out / "tokenizer.json").write_text(tok_json)
        _write_json(
            out / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "unk_token": None,
                "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.seq_len,
                "chat_template": CHAT_TEMPLATE,
            },
        )
        _write_json(
            out / "generation_config.json",
            {
                "bos_token_id": bos_id,
                "eos_token_id": eos_id,
                "pad_token_id": pad_id,
                "do_sample": True,
                "temperature": 0.8,
                "top_p": 0.95,
                "max_new_tokens": 128,
            },
        )

        import tokenizers

        files = {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size} for n in ARTIFACT_FILES}
        record = {
            "format": RECORD_FORMAT,
            "model_name": MODEL_NAME,
            "corpus": {
                "file": "builtin_model/corpus/kjv.txt",
                "sha256": sha256_bytes(text.encode("ascii")),
                "bytes": len(text),
                "source": "King James Version (1611), from Debian package bible-kjv-text 4.38 (see corpus/README.md)",
                "license": "public domain",
                "chapters": len(chapters),
                "train_documents": len(train_docs),
                "val_documents": len(val_docs),
                "train_tokens": train_stream.numel(),
                "val_tokens": val_stream.numel(),
            },
            "tokenizer": {
                "type": "byte-level BPE (tokenizers)",
                "sha256": sha256_bytes(tok_json.encode()),
                "vocab_size": tok.get_vocab_size(),
                "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
                "chat_template": CHAT_TEMPLATE,
            },
            "hyperparameters": dataclasses.asdict(cfg),
            "seed": cfg.seed,
            "trainer": backend.name,
            "parameters": n_params,
            "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
            "loss_curve": curve,
            "final_train_loss": curve[-1]["train_loss"],
            "val_loss": round(val_loss, 5),
            "val_loss_saved_dtype": round(val_loss_saved, 5),
            "wall_time_s": {"train_loop": round(train_seconds, 2), "total": round(time.perf_counter() - t_start, 2)},
            "cpu_time_s": round(time.process_time() - cpu_start, 2),
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "tokenizers": tokenizers.__version__,
                "transformers": _version("transformers"),
                "platform": platform.platform(),
                "machine": platform.machine(),
                "threads": cfg.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            },
            "code": {"trainer_sha256": trainer_digest(), **_git_commit()},
            "files": files,
            "reproducibility": (
                "Same seed + hyper-parameters + thread count + software versions on the same "
                "kind of CPU give bitwise-identical model.safetensors; the corpus, tokenizer.json "
                "and data order are identical everywhere. Other CPUs, thread counts or torch "
                "versions change floating-point reduction order, so weights differ in the last "
                "bits and losses agree only approximately. wall_time_s and elapsed_s never repeat."
            ),
        }
        _write_json(out / RECORD_NAME, record)
        say(
            f"val loss {val_loss:.4f} ({cfg.save_dtype}: {val_loss_saved:.4f}); wrote {out} "
            f"in {record['wall_time_s']['total']:.1f}s"
        )
        return record
    finally:
        torch.set_num_threads(prev_threads)


def _short_omp_spin() -> None:
    """Let idle OpenMP threads spin only briefly before they sleep. It changes no result, but
    with libgomp's default spin a 2-thread run slows down 4-15x as soon as another process
    wants one of the two cores (measured here: 0.1 s/step alone; 0.4-1.9 s/step beside one busy
    process with the default, 0.22 s with GOMP_SPINCOUNT=1000, whose cost alone is within
    noise; OMP_WAIT_POLICY=PASSIVE is 0.18 s beside the busy process but 40% slower alone).
    libgomp reads the variable when torch is first imported, so this only takes effect if torch
    is not imported yet (as under ``strata train``); a value already set is kept."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str = "strata train") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train Strata's built-in model (a small Llama) on the bundled public-domain "
        "King James Bible text and write an HF-format checkpoint with its training "
        "record. The defaults reproduce the shipped model in under 2 minutes (about "
        "80 s) on 2 CPU cores.",
    )
    p.add_argument("--out", default=".strata/builtin-model", help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads; bitwise-identical weights are promised only for the same value (%(default)s)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any other hyper-parameter, e.g. --set lr=1e-3 "
        f"(keys: {', '.join(f.name for f in dataclasses.fields(TrainConfig))})",
    )
    p.add_argument(
        "--compare",
        metavar="DIR",
        nargs="?",
        const=str(SHIPPED_MODEL_DIR),
        help="after training, compare the weights with those in DIR (default: the "
        "shipped model) and exit 1 if they differ",
    )
    p.add_argument("--quiet", action="store_true", help="print only the result")
    return p


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise TrainError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        typ = types[key]
        try:
            if typ is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1", "yes")
            else:
                value = typ(raw)
        except ValueError:
            raise TrainError(f"--set {pair!r}: {raw!r} is not a valid {typ.__name__}") from None
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None, prog: str = "strata train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `strata train -- --steps 10` passes the separator through
        argv = argv[1:]
    args = build_parser(prog).parse_args(argv)
    try:
        overrides = _parse_overrides(args.set)
        for k in ("steps", "seed", "threads"):
            if k in overrides:
                raise TrainError(f"use --{k} instead of --set {k}=...")
        record = train(
            args.out,
            steps=args.steps,
            seed=args.seed,
            threads=args.threads,
            overwrite=args.force,
            log=None if args.quiet else print,
            **overrides,
        )
    except TrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {args.out}  (val loss {record['val_loss_saved_dtype']}, {record['wall_time_s']['total']}s)")
    if args.compare:
        result = compare_weights(args.out, args.compare)
        if result.get("identical"):
            print(f"{prog}: weights are bitwise identical to {args.compare}")
        else:
            print(f"{prog}: weights differ from {args.compare}: {json.dumps(result)}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
