"""Load an HF-format checkpoint directory: config, safetensors weights (single or sharded), tokenizer,
chat template and generation defaults. Pickle checkpoints are refused: unpickling runs code."""
from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, parse_dtype
from .dtypes import default_dtype
from .errors import (CheckpointError, ConfigError, MissingFileError, MissingTensorError,
                     PickleCheckpointError, ShapeMismatchError, UnexpectedTensorError)
from .model import Transformer
from .cpu_linear import pack_model
from .quant import parse_quantize, quantize_model
from .weights import hf_weight_names, is_norm, split_rows
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
# Tensors some exporters write that carry nothing we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class GenerationDefaults:
    """What generation_config.json says (vLLM-style: used as the default sampling params)."""
    eos_token_ids: list[int] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    generation: GenerationDefaults


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None, max_seq_len: int | None = None,
                    quantize: str | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: checkpoint directory not found", path=path)
    device = torch.device(device)
    cfg = ModelConfig.from_file(path / "config.json")
    files = find_weight_files(path)  # before the tokenizer: refuse pickle first
    tokenizer = Tokenizer.from_dir(path)
    generation = read_generation_config(path, cfg, tokenizer)
    quantize = parse_quantize(quantize)
    dtype = parse_dtype(dtype) or default_dtype(cfg, device, quantize)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    load_weights(model, cfg, files, path)
    quantize_model(model, quantize)  # after loading: quantized from the checkpoint's own values
    pack_model(model)  # last: the linears left in bf16 on CPU, in oneDNN's layout
    model.eval().requires_grad_(False)
    model.init_rope(max_seq_len or cfg.max_position_embeddings)
    return Checkpoint(path, cfg, model, tokenizer, generation)


def _refuse_pickle(file: Path) -> PickleCheckpointError:
    return PickleCheckpointError(
        f"{file}: refusing to load a pickle checkpoint ({file.suffix}): unpickling can run arbitrary "
        f"code. Convert it to safetensors (e.g. transformers' save_pretrained(safe_serialization=True)).",
        path=file)


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files to read, from the index when there is one. Never opens a pickle."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{index}: not a valid safetensors index ({e!r})", path=index) from e
        files = []
        for name in sorted(set(weight_map.values())):
            f = path / name
            if not name.endswith(".safetensors"):
                raise _refuse_pickle(f) if f.suffix in PICKLE_SUFFIXES else CheckpointError(
                    f"{index}: shard {name!r} is not a .safetensors file", path=index)
            if not f.is_file():
                raise MissingFileError(f"{f}: shard listed in {index.name} is missing", path=f)
            files.append(f)
        return files
    files = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise MissingFileError(f"{path}: no *.safetensors weights found", path=path)
    if pickles:
        log.warning("%s: ignoring pickle files %s; loading safetensors only", path,
                    ", ".join(p.name for p in pickles))
    return files


def load_weights(model: Transformer, cfg: ModelConfig, files: list[Path], path: Path) -> None:
    """Copy checkpoint tensors into the (already allocated) model, fusing q/k/v and gate/up.

    Tensors are read one at a time from the memory-mapped files and cast/moved straight into
    their slice of the destination parameter, so peak memory is the model plus one tensor."""
    from safetensors import safe_open

    wanted = hf_weight_names(cfg)
    known = {hf for srcs in wanted.values() for hf in srcs}
    where = path / INDEX_NAME if (path / INDEX_NAME).is_file() else (files[0] if len(files) == 1 else path)
    with ExitStack() as stack:
        handles, key_file = {}, {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})", path=f) from e
            for k in handles[f].keys():
                key_file[k] = f
        stored = _bare_decoder_names(key_file)  # our HF name -> the name in the file, where they differ
        prefixed = {k: ours for ours, k in stored.items()}
        key_file = {prefixed.get(k, k): f for k, f in key_file.items()}
        if stored and "lm_head.weight" in wanted and "lm_head.weight" not in key_file:
            # an embedding model's bare decoder, its vocabulary untied: it has no LM head, and embeds only
            log.warning("%s: no lm_head.weight in a bare decoder's files: loaded for embeddings only", path)
            del wanted["lm_head.weight"]
            with torch.no_grad():
                model.lm_head.weight.zero_()  # not left as whatever memory to_empty() handed over
            model.can_generate = False
        for k, f in key_file.items():
            if k in known or k.endswith(IGNORED_SUFFIXES):
                continue
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the output projection
            raise UnexpectedTensorError(
                f"{f}: unexpected tensor {k!r} (not part of {cfg.architecture} with this config)",
                path=f, tensor=k)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for ours, srcs in wanted.items():
                param = params[ours]
                flat = param.view(-1, param.shape[-1]) if param.dim() == 3 else param  # stacked experts
                offset = 0
                for name, n in zip(srcs, split_rows(ours, cfg, flat.shape[0], len(srcs))):
                    if name not in key_file:
                        raise MissingTensorError(f"{where}: tensor {name!r} is missing", path=where,
                                                 tensor=name)
                    f = key_file[name]
                    shape = tuple(handles[f].get_slice(stored.get(name, name)).get_shape())
                    expected = (n, *flat.shape[1:])
                    if shape != expected:
                        raise ShapeMismatchError(
                            f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(expected)} "
                            f"from config.json", path=f, tensor=name)
                    value = handles[f].get_tensor(stored.get(name, name))
                    if cfg.norm_offset and is_norm(ours):  # Gemma's (1 + w), added in fp32
                        value = value.float() + cfg.norm_offset
                    flat[offset:offset + n].copy_(value)
                    offset += n


def _bare_decoder_names(key_file: dict[str, Path]) -> dict[str, str]:
    """A checkpoint saved from the bare decoder (``Qwen3Model``, as Qwen3-Embedding ships its files)
    names its tensors without the ``model.`` prefix of a ``*ForCausalLM``: {prefixed name: stored name}
    for each of them, or {} for an ordinary checkpoint."""
    if "model.embed_tokens.weight" in key_file or "embed_tokens.weight" not in key_file:
        return {}
    return {f"model.{k}": k for k in key_file if not k.startswith("lm_head.")}


def read_generation_config(path: Path, cfg: ModelConfig, tokenizer: Tokenizer) -> GenerationDefaults:
    f = path / "generation_config.json"
    data = {}
    if f.is_file():
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f}: not valid JSON ({e})", path=f) from e
    eos = data.get("eos_token_id")
    if eos is None:
        eos_ids = list(cfg.eos_token_ids)
    else:
        eos_ids = [int(x) for x in eos] if isinstance(eos, list) else [int(eos)]
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = [tokenizer.eos_token_id]
    top_k = data.get("top_k")
    return GenerationDefaults(
        eos_token_ids=eos_ids, temperature=data.get("temperature"), top_p=data.get("top_p"),
        top_k=int(top_k) if top_k is not None else None, max_new_tokens=data.get("max_new_tokens"))
