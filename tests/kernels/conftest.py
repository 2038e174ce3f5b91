"""Kernel tests: the Triton kernels against their torch references.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET has to
be set before triton is imported, and pytest imports this file before the test modules.
(The kernels also pick the interpreter on their own when triton was imported earlier; see
services/inference_worker/kernels/_compat.py.) With CUDA the kernels run compiled on the GPU.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def pytest_collection_modifyitems(config, items):
    if HAS_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not importable here, so the Triton kernels cannot run")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
