"""Shared tolerances and comparison for the kernel tests."""

import torch

# (atol, rtol) per dtype. bf16 has an 8-bit mantissa; also the interpreter truncates
# fp32 -> bf16 instead of rounding to nearest, so allow about two ulps there.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
ATTENTION_TOLERANCES = {**TOLERANCES, torch.float32: (1e-4, 1e-4)}
DTYPES = list(TOLERANCES)


def assert_close(actual, expected, dtype, tolerances=TOLERANCES):
    atol, rtol = tolerances[dtype]
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
