"""`strata model convert`: a version in the store as GGUF (F16, Q8_0 or Q4_K_M), described by a
``ModelSource`` of kind conversion that names the version it came from (``derived_from``).

It runs where the CLI runs, on a copy pulled (signature and digests checked) into a temp directory,
and the result goes back through the one push path. Why there and not in model-store: conversion
is minutes of CPU and a few times the model's size on disk for a real model, which would stall the
store's event loop and fill its spool; model-store stays a signing, content-addressed store that
still checks the result like any push (GGUF header read at upload), and the lineage it records is
the pusher's claim, under the same admin key as ``push --dataset``. The input is checked against
the signed manifest before anything is converted.

Safetensors -> GGUF F16 is hf_to_gguf.py (Llama family only); F16 -> Q8_0 / Q4_K_M is llama.cpp's own
quantizer (``llama_model_quantize`` through llama-cpp-python).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

from shared.catalog import ResolvedModel
from shared.errors import Invalid
from shared.model_source import CONVERSION, ModelSource

from services.model_store.convert.hf_to_gguf import write_llama_gguf

QUANT_NAMES = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
QUANTIZABLE = {"F32", "F16", "BF16"}  # a GGUF of these is quantized as is; an already quantized one is refused


@dataclass(frozen=True)
class Conversion:
    path: Path
    quantization: str
    source: ModelSource
    seconds: float
    f16_seconds: float
    quantize_seconds: float


def convert_model(
    resolved: ResolvedModel, checkpoint: Path, out_dir: Path, quant: str, *, threads: int = 0
) -> Conversion:
    """``checkpoint``: the pulled files of ``resolved``. Returns the one GGUF file written under ``out_dir``."""
    if quant not in QUANT_NAMES:
        raise Invalid(f"--quant {quant!r}: expected one of {', '.join(QUANT_NAMES)}")
    m, meta = resolved.manifest, resolved.manifest.metadata
    target = QUANT_NAMES[quant]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{m.name}-{m.version}.{target}.gguf"
    started = time.perf_counter()
    if meta.format == "gguf":
        ggufs = [f.path for f in m.files if f.path.endswith(".gguf")]
        if len(ggufs) != 1:
            raise Invalid(f"{m.name}:{m.version} is a GGUF in {len(ggufs)} parts; only a single-file GGUF is converted")
        if meta.quantization not in QUANTIZABLE:
            raise Invalid(
                f"{m.name}:{m.version} is already {meta.quantization}: quantizing it again loses quality; "
                f"convert its {', '.join(sorted(QUANTIZABLE))} source instead"
            )
        if meta.quantization == target:
            raise Invalid(f"{m.name}:{m.version} is already a GGUF {target}")
        f16, f16_seconds = checkpoint / ggufs[0], 0.0
    else:
        f16 = out if target == "F16" else out_dir / f"{m.name}-{m.version}.F16.gguf"
        write_llama_gguf(checkpoint, f16, "f16", name=m.name)
        f16_seconds = time.perf_counter() - started
    quantize_seconds = 0.0
    if f16 != out:
        begun = time.perf_counter()
        quantize(f16, out, target, threads=threads)
        quantize_seconds = time.perf_counter() - begun
        if f16.parent == out_dir:
            f16.unlink()
    recipe = "safetensors -> GGUF F16 (strata's Llama writer)" if meta.format != "gguf" else f"GGUF {meta.quantization}"
    if target != "F16":
        recipe += f" -> {target} (llama.cpp quantize, llama-cpp-python {_llama_cpp_version()})"
    source = ModelSource(
        kind=CONVERSION,
        name=m.name,
        reference=str(m.version),
        derived_from=resolved.model.digest,
        digests={f.path: f"sha256:{f.sha256}" for f in m.files},
        recipe=recipe,
    )
    return Conversion(
        path=out,
        quantization=target,
        source=source,
        seconds=time.perf_counter() - started,
        f16_seconds=f16_seconds,
        quantize_seconds=quantize_seconds,
    )


def quantize(src: Path, dst: Path, target: str, *, threads: int = 0) -> None:
    """llama.cpp's quantizer, ``src`` (F32/F16/BF16 GGUF) -> ``dst`` at ``target`` (Q8_0 or Q4_K_M)."""
    import llama_cpp as C

    ftypes = {"Q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": C.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    _quiet_llama_log()
    C.llama_backend_init()
    params = C.llama_model_quantize_default_params()
    params.ftype = ftypes[target]
    params.nthread = threads
    rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        dst.unlink(missing_ok=True)
        said = "; ".join(line.strip() for line in _llama_errors[-3:])
        raise Invalid(
            f"llama.cpp could not quantize {src.name} to {target} (llama_model_quantize returned {rc}"
            f"{': ' + said if said else ''})"
        )


_llama_errors: list[str] = []
_log_callback = None  # kept referenced: llama.cpp calls it for as long as it is set


def _quiet_llama_log() -> None:
    """llama.cpp prints every tensor it quantizes; keep only its error lines (ggml level 4), for the message."""
    global _log_callback
    import llama_cpp as C

    if _log_callback is None:

        @C.llama_log_callback
        def keep_errors(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            if level == 4:
                _llama_errors.append(text.decode(errors="replace"))

        _log_callback = keep_errors
    C.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__
