"""Guarded Triton import and the helpers shared by the kernel files.

The engine must import on machines without Triton (it then uses the torch references), so
every kernel file defines its @jit functions only when ``HAS_TRITON`` is true.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS, Windows, or a torch-only install
    triton = None
    tl = None
    HAS_TRITON = False


# Without CUDA the interpreter is the only way to run a kernel, so choose it for our kernels
# even when TRITON_INTERPRET is unset; an explicit TRITON_INTERPRET always wins.
FORCE_INTERPRETER = HAS_TRITON and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()


def jit(fn):
    """``triton.jit``, interpreted on a machine without CUDA.

    Triton chooses compiled vs. interpreted when the decorator runs, from TRITON_INTERPRET,
    and this module may be imported before a test sets it (``transformers`` even imports
    triton on its own), so set it here while our kernels are decorated.
    """
    if not FORCE_INTERPRETER:
        return triton.jit(fn)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return triton.jit(fn)
    finally:
        del os.environ["TRITON_INTERPRET"]


if HAS_TRITON:

    def _callable_in_interpreter(f):
        # triton's own @jit helpers (tl.sum, tl.max) are built once, when triton is imported.
        # If that happened without TRITON_INTERPRET, they are compiled-mode functions that an
        # interpreted kernel cannot call; their Python bodies run fine there.
        if FORCE_INTERPRETER and type(f).__name__ == "JITFunction":
            return f.fn
        return f

    # Kernels reduce with these instead of tl.sum / tl.max; on a GPU they are the same objects.
    tsum = _callable_in_interpreter(tl.sum)
    tmax = _callable_in_interpreter(tl.max)
else:  # the kernels that reduce with them are defined only with Triton; their files still import
    tsum = tmax = None


def check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
