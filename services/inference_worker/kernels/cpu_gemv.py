"""Decode-sized products on CPU (1 to MAX_ROWS rows of x): bf16 or int8 weights, bf16 activations,
fp32 accumulation, bf16 out. The kernels are cpu_gemv.cpp; the torch references are below.

Why our own loops: a decode step is matrix-vector products that stream every weight from memory once,
and torch's CPU kernels stream well under the memory's speed at these sizes. On the 2-core AVX-512 VM
of issue #24, one thread, a [5632, 1024] weight 16 times over (a plain read of the same bytes: 13.4
GB/s), bf16: oneDNN with its weights prepacked 10.3 to 10.5 GB/s at 1 to 8 rows; our AVX-512 loop
(vdpbf16ps) 14.4 at 1 row but 10.2 at 4 and 9.2 at 8, where it runs out of compute; our AMX loop 12.7
at 1 row and 12.1 to 12.3 at 4 to 8. So bf16 takes the AVX-512 loop at 1 row and AMX past it where the
CPU has AMX (Sapphire Rapids on), and the AVX-512 loop throughout elsewhere. int8: torch's
``_weight_int8pack_mm`` 5.7 GB/s at 1 row and 2.4 at 8, our AVX-512 loop 10.2 and 4.7, our AMX loop
6.3 to 6.6 throughout, on the same [N, K] layout (bench/cpu_linear.py prints them all).

It needs x86 with AVX-512 BF16 (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) and a C++
compiler (g++, or ``CXX``) where the library is not in ``STRATA_KERNEL_CACHE`` yet (default
``~/.cache/strata/kernels``; the CPU worker image holds it prebuilt). It is built once per source, about
2 s, and loaded with ctypes: a plain C ABI, so no torch headers to compile. Where either is missing,
or ``STRATA_CPU_GEMV=off`` is set (read when a model loads), ``unavailable()`` says why and the callers
keep torch's kernels.
OpenMP comes from torch's own libgomp, already loaded, so the loop's threads are torch's
(``torch.get_num_threads()``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

MAX_ROWS = 8
# int8 takes AMX from this many rows of x, where the CPU has it: widening the weights to bf16 caps that
# loop at ~6.4 GB/s of int8 at any row count, which the AVX-512 loop beats up to 4 rows (10.2 at 1, 6.6
# at 4) and not past them (4.7 at 8)
INT8_AMX_ROWS = 5
SOURCE = Path(__file__).with_suffix(".cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
COMPILE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
                 "-mavx512dq", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16")


def gemv_bf16_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The torch definition: an fp32 linear of the bf16 values, rounded to bf16 once."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)


def gemv_int8_ref(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """The torch definition: the int8 rows scaled in fp32, then as gemv_bf16_ref."""
    y = F.linear(x.float(), qweight.float()) * scales.float()
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


def fits(x: Tensor) -> bool:
    """Whether these kernels take ``x``: bf16 on the CPU, 1 to MAX_ROWS rows. Whether they are built here
    is ``unavailable()``, asked once by the layer that holds the weights (a check on shapes only, so
    that torch.compile traces it into a guard)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and 0 < x.numel() // x.shape[-1] <= MAX_ROWS


def unavailable() -> str | None:
    """None where the kernels run here, else why not."""
    if (switch := os.environ.get("STRATA_CPU_GEMV", "on").strip().lower()) not in ("on", "off", ""):
        raise ValueError(f"STRATA_CPU_GEMV={switch!r}: use on or off")
    if switch == "off":
        return "turned off (STRATA_CPU_GEMV=off)"
    return _library()[1]


def gemv_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] bf16 with at most MAX_ROWS rows; weight [N, K] bf16, contiguous; bias [N] bf16 or None."""
    if torch.compiler.is_compiling():
        return torch.ops.strata.gemv_bf16(x, weight, bias)
    return _gemv_bf16(x, weight, bias)


def gemv_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """As gemv_bf16 with int8 weights [N, K] and one bf16 scale per row n."""
    if torch.compiler.is_compiling():
        return torch.ops.strata.gemv_int8(x, qweight, scales, bias)
    return _gemv_int8(x, qweight, scales, bias)


# Custom ops for torch.compile (engine/compiled_decode.py), which keeps each as one opaque call. Eager
# code calls the functions themselves: the op's dispatch cost about 10 % of a product's time at the
# bench model's sizes (a 5632 x 1024 weight, 1 or 8 rows).
def _gemv_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check(x, weight, torch.bfloat16, bias)
    rows, y = _rows_and_out(x, weight)
    x2 = x.reshape(rows, -1).contiguous()
    n, k = weight.shape
    lib = _library()[0]
    # one row: the AVX-512 loop streams faster (14.4 GB/s against AMX's 12.7 on issue #24's VM); two or
    # more: AMX (12.1 to 12.8 at 2 to 8 rows, where the AVX-512 loop falls to 9.2)
    loop = lib.strata_gemv_bf16_amx if rows > 1 and amx() else lib.strata_gemv_bf16
    loop(x2.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), rows, k, n, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


def _gemv_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    _check(x, qweight, torch.int8, bias)
    if scales.dtype != torch.bfloat16 or scales.shape != (qweight.shape[0],) or not scales.is_contiguous():
        raise ValueError(f"gemv_int8: scales must be contiguous bf16 [{qweight.shape[0]}], got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    rows, y = _rows_and_out(x, qweight)
    x2 = x.reshape(rows, -1).contiguous()
    n, k = qweight.shape
    lib = _library()[0]
    loop = lib.strata_gemv_int8_amx if rows >= INT8_AMX_ROWS and amx() else lib.strata_gemv_int8
    loop(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), rows, k, n,
         torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


_bf16_op = torch.library.custom_op("strata::gemv_bf16", _gemv_bf16, mutates_args=())
_int8_op = torch.library.custom_op("strata::gemv_int8", _gemv_int8, mutates_args=())


@_bf16_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@_int8_op.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check(x: Tensor, weight: Tensor, weight_dtype: torch.dtype, bias: Tensor | None) -> None:
    """The C loop trusts its pointers, so every shape and dtype it relies on is checked here."""
    problems = []
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        problems.append(f"x must be bf16 on the CPU, got {x.dtype} on {x.device}")
    if weight.dtype != weight_dtype or weight.dim() != 2 or not weight.is_contiguous():
        problems.append(f"weight must be a contiguous 2-d {weight_dtype}, got {weight.dtype} {tuple(weight.shape)}")
    elif x.shape[-1] != weight.shape[1]:
        problems.append(f"x has {x.shape[-1]} features, the weight {weight.shape[1]}")
    elif not 0 < x.numel() // x.shape[-1] <= MAX_ROWS:
        problems.append(f"x has {x.numel() // max(x.shape[-1], 1)} rows; these kernels take 1 to {MAX_ROWS}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (weight.shape[0],)
                             or not bias.is_contiguous()):
        problems.append(f"bias must be contiguous bf16 [{weight.shape[0]}], got {bias.dtype} {tuple(bias.shape)}")
    if problems:
        raise ValueError("cpu_gemv: " + "; ".join(problems))
    if (reason := unavailable()) is not None:
        raise RuntimeError(f"cpu_gemv is not available here: {reason}")


def _rows_and_out(x: Tensor, weight: Tensor) -> tuple[int, Tensor]:
    rows = x.numel() // x.shape[-1]
    return rows, torch.empty(rows, weight.shape[0], dtype=torch.bfloat16)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded kernels, None), or (None, why not). Built on first use, then reused from the cache."""
    missing = [flag for flag in CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cpu_gemv: not built (%s); torch's CPU kernels serve every product", exc)
        return None, f"build failed: {exc}"
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.strata_gemv_bf16.argtypes = lib.strata_gemv_bf16_amx.argtypes = [pointer] * 4 + [i64] * 3 + [ctypes.c_int]
    lib.strata_gemv_int8.argtypes = lib.strata_gemv_int8_amx.argtypes = [pointer] * 5 + [i64] * 3 + [ctypes.c_int]
    return lib, None


@functools.cache
def amx() -> bool:
    """Whether bf16 products take the AMX loop: the CPU has AMX-BF16 and Linux lets this process use it."""
    lib = _library()[0]
    if lib is None or any(flag not in _cpu_flags() for flag in AMX_FLAGS):
        return False
    if (code := lib.strata_amx_init()) != 0:
        log.warning("cpu_gemv: Linux refused AMX to this process (arch_prctl %d); bf16 takes the AVX-512 loop", code)
        return False
    return True


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build() -> Path:
    """The shared library for this source and these flags, built into the cache where missing (the CPU
    worker image runs this at build time, so a node needs no compiler). Any compiler will do: the
    functions are plain C, so the key is the source and the flags. Built to a temporary name and
    renamed, so a worker starting beside another never loads a half-written file."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("STRATA_KERNEL_CACHE") or Path.home() / ".cache" / "strata" / "kernels")
    target = cache / f"cpu_gemv-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or "g++"
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep it from the user a container image runs as
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("cpu_gemv: built %s", target)
    return target
