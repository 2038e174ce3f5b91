"""kernels/cpu_gemv.py: the decode-sized CPU loops against their torch references over odd shapes (tails
along K and N, every row count), bias, NaN, threads; bad input refused before the C code sees it; and
what happens where the loops cannot be built."""

from __future__ import annotations

import pytest
import torch

from services.inference_worker.kernels import cpu_gemv

needs_gemv = pytest.mark.skipif(cpu_gemv.unavailable() is not None,
                                reason=f"cpu_gemv does not run here: {cpu_gemv.unavailable()}")

SHAPES = [(1, 1), (7, 33), (17, 64), (37, 31), (100, 64), (250, 130), (96, 1000)]  # (N, K)
# the two loops: AMX where the CPU has it (bf16 past 1 row, int8 past INT8_AMX_ROWS - 1), AVX-512 elsewhere
# (and here too, chosen by hand)
BF16_LOOPS = ["avx512", pytest.param("amx", marks=pytest.mark.skipif(
    cpu_gemv.unavailable() is not None or not cpu_gemv.amx(), reason="no AMX-BF16 here (or Linux refuses it)"))]


@pytest.fixture(params=BF16_LOOPS)
def loop(request, monkeypatch):
    monkeypatch.setattr(cpu_gemv, "amx", lambda: request.param == "amx")
    return request.param


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The only rounding that differs is fp32's order of addition; both round to bf16 once."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    scale = ref.float().abs().max().item()
    assert torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * scale), (out - ref).abs().max()


@needs_gemv
@pytest.mark.parametrize("rows", range(1, cpu_gemv.MAX_ROWS + 1))
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_matches_the_reference(rows, n, k, bias, loop):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    _close(cpu_gemv.gemv_bf16(x, w, b), cpu_gemv.gemv_bf16_ref(x, w, b))


@needs_gemv
@pytest.mark.parametrize("rows", range(1, cpu_gemv.MAX_ROWS + 1))
@pytest.mark.parametrize("n, k", SHAPES)
def test_int8_matches_the_reference(rows, n, k, loop):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, b = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) / 64).bfloat16()
    _close(cpu_gemv.gemv_int8(x, q, scales, b), cpu_gemv.gemv_int8_ref(x, q, scales, b))
    _close(cpu_gemv.gemv_int8(x, q, scales, None), cpu_gemv.gemv_int8_ref(x, q, scales))


@needs_gemv
def test_leading_dimensions_strides_and_threads(loop):
    """x [batch, 1, K] as the decode step passes it, a non-contiguous x, and 1 or 2 threads: the same bits."""
    x = torch.randn(4, 1, 96).bfloat16()
    w = torch.randn(70, 96).bfloat16()
    out = cpu_gemv.gemv_bf16(x, w, None)
    assert out.shape == (4, 1, 70)
    _close(out, cpu_gemv.gemv_bf16_ref(x, w))
    strided = torch.randn(96, 3).bfloat16().t()  # [3, 96], not contiguous
    assert torch.equal(cpu_gemv.gemv_bf16(strided, w, None), cpu_gemv.gemv_bf16(strided.contiguous(), w, None))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.gemv_bf16(x, w, None)
        torch.set_num_threads(2)
        two = cpu_gemv.gemv_bf16(x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is summed by one thread in one order


@needs_gemv
def test_nan_and_inf_propagate(loop):
    x = torch.ones(2, 40).bfloat16()
    w = torch.ones(3, 40).bfloat16()
    w[0, 5], w[1, 39] = float("nan"), float("inf")
    out = cpu_gemv.gemv_bf16(x, w, None)
    assert out[:, 0].isnan().all() and out[:, 1].isposinf().all() and (out[:, 2] == 40).all()


@needs_gemv
@pytest.mark.parametrize("case, message", [
    ("rows", "these kernels take 1 to 8"),
    ("dtype", "x must be bf16"),
    ("features", "x has 32 features, the weight 33"),
    ("weight", "weight must be a contiguous 2-d torch.bfloat16"),
    ("bias", "bias must be contiguous bf16 [5]"),
])
def test_bad_input_is_refused_with_the_reason(case, message):
    x, w, b = torch.randn(2, 33).bfloat16(), torch.randn(5, 33).bfloat16(), None
    if case == "rows":
        x = torch.randn(9, 33).bfloat16()
    elif case == "dtype":
        x = x.float()
    elif case == "features":
        x = torch.randn(2, 32).bfloat16()
    elif case == "weight":
        w = torch.randn(33, 5).bfloat16().t()
    else:
        b = torch.randn(4).bfloat16()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cpu_gemv.gemv_bf16(x, w, b)


@needs_gemv
def test_int8_scales_are_checked():
    x, q = torch.randn(1, 16).bfloat16(), torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales must be contiguous bf16"):
        cpu_gemv.gemv_int8(x, q, torch.ones(4), None)


def test_fits_is_a_check_on_shapes():
    assert cpu_gemv.fits(torch.zeros(8, 1, 4, dtype=torch.bfloat16))
    assert not cpu_gemv.fits(torch.zeros(9, 4, dtype=torch.bfloat16))
    assert not cpu_gemv.fits(torch.zeros(1, 4, dtype=torch.float16))


def test_a_failed_build_says_why_and_leaves_nothing_behind(tmp_path, monkeypatch):
    compiler = tmp_path / "cxx"
    compiler.write_text('#!/bin/sh\necho "cpu_gemv.cpp:1: error: no such instruction" >&2\nexit 1\n')
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("STRATA_KERNEL_CACHE", str(cache))
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: set(cpu_gemv.CPU_FLAGS))
    cpu_gemv._library.cache_clear()
    try:
        reason = cpu_gemv.unavailable()
    finally:
        cpu_gemv._library.cache_clear()
    assert reason is not None and reason.startswith("build failed") and "no such instruction" in reason
    assert list(cache.iterdir()) == []  # no half-written library left behind


def test_a_cpu_without_the_instructions_is_named(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: {"avx2", "avx512f"})
    cpu_gemv._library.cache_clear()
    try:
        reason = cpu_gemv.unavailable()
    finally:
        cpu_gemv._library.cache_clear()
    assert reason == "this CPU lacks avx512bw, avx512vl, avx512_bf16"


@needs_gemv
def test_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_KERNEL_CACHE", str(tmp_path))
    first = cpu_gemv.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_gemv.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert first.stat().st_mode & 0o777 == 0o755  # loadable by another user (the image's, built as root)


def test_the_switch_turns_it_off_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("STRATA_CPU_GEMV", "off")
    assert cpu_gemv.unavailable() == "turned off (STRATA_CPU_GEMV=off)"
    monkeypatch.setenv("STRATA_CPU_GEMV", "maybe")
    with pytest.raises(ValueError, match="STRATA_CPU_GEMV='maybe': use on or off"):
        cpu_gemv.unavailable()


@needs_gemv
def test_a_library_in_the_cache_needs_no_compiler(tmp_path, monkeypatch):
    """As in the CPU worker image: built at image build time, loaded where no compiler is installed."""
    monkeypatch.setenv("STRATA_KERNEL_CACHE", str(tmp_path))
    cpu_gemv.build()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_gemv._library.cache_clear()
    try:
        assert cpu_gemv.unavailable() is None
    finally:
        cpu_gemv._library.cache_clear()
