"""Compile every kernel for real GPUs on a machine without one.

The interpreter runs kernels as Python, so it accepts code the Triton compiler rejects.
Triton's NVIDIA backend (ptxas included) compiles without a GPU, so CPU-only CI can still
catch that. On a CUDA machine the other tests run the compiled kernels, so this is skipped.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = lambda name: importlib.import_module("services.inference_worker.kernels." + name)
    rn, ro, sw, pa = mod("rms_norm"), mod("rope"), mod("swiglu"), mod("paged_attention")

    def build(fn, types, consts, arch, num_warps=4):
        assert type(fn).__name__ == "JITFunction", type(fn)
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert kernel.asm["cubin"], fn

    for arch in (80, 90):
        for dt in ("bf16", "fp32"):
            P = "*" + dt
            i32 = "i32"
            build(rn._rms_norm_kernel,
                  dict(x_ptr=P, res_ptr=P, weight_ptr=P, y_ptr=P, new_res_ptr=P, x_row_stride=i32,
                       res_row_stride=i32, y_row_stride=i32, new_res_row_stride=i32, n_cols=i32, eps="fp32"),
                  dict(HAS_RESIDUAL=True, BLOCK=4096), arch, num_warps=16)
            build(ro._rope_kernel,
                  dict(x_ptr=P, cos_ptr="*fp32", sin_ptr="*fp32", out_ptr=P, x_stride_t=i32, x_stride_h=i32,
                       cs_stride_t=i32, out_stride_t=i32, out_stride_h=i32, n_heads=i32, half=i32),
                  dict(BLOCK_HEADS=32, BLOCK_HALF=64), arch)
            build(sw._swiglu_kernel,
                  dict(gu_ptr=P, out_ptr=P, gu_row_stride=i32, out_row_stride=i32, inter=i32),
                  dict(GELU=True, BLOCK=1024), arch)
            build(pa._partition_kernel,
                  dict(q_ptr=P, k_ptr=P, v_ptr=P, bt_ptr="*i32", ctx_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32",
                       acc_ptr="*fp32", scale="fp32", window=i32, softcap="fp32", q_stride_b=i32, q_stride_h=i32,
                       k_stride_blk=i32, k_stride_slot=i32, k_stride_h=i32, v_stride_blk=i32, v_stride_slot=i32,
                       v_stride_h=i32, bt_stride_b=i32, n_parts=i32),
                  dict(GROUP=7, BLOCK_G=8, HEAD_DIM=80, BLOCK_D=128, PAGE_SIZE=16, PARTITION_SIZE=256, BLOCK_N=8,
                       USE_SOFTCAP=True),
                  arch, num_warps=8)
            build(pa._reduce_kernel,
                  dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", ctx_ptr="*i32", out_ptr=P, window=i32,
                       out_stride_b=i32, out_stride_h=i32, n_parts=i32),
                  dict(HEAD_DIM=80, BLOCK_D=128, PARTITION_SIZE=256, BLOCK_P=16), arch)
    print("compiled")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests run the compiled kernels")
def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
