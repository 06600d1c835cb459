"""Shared test helpers: which backends to test, tolerances, and comparisons that explain."""

from __future__ import annotations

import pytest
import torch

from fusedce.kernels import _load, available_backends

# Kernel-vs-reference tolerances (atol, rtol). Both sides accumulate in float32 (float64 for
# float64), so they differ only by summation order and the final rounding to the output dtype.
TOLERANCES = {
    "kernel": {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (2e-5, 2e-5),
        torch.bfloat16: (2e-2, 1.6e-2),
        torch.float16: (2e-3, 2e-3),
    },
}


def kernel_backends() -> list:
    """One pytest param per backend module that can run on CPU tensors here."""
    return [pytest.param(_load(name), id=name) for name in available_backends("cpu")]


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    """assert_close with NaNs equal, whose failure names the case and the worst element."""
    atol, rtol = tol
    actual_f, expected_f = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_mismatch = actual_f.isnan() != expected_f.isnan()
    if nan_mismatch.any():
        idx = tuple(int(i) for i in nan_mismatch.nonzero()[0])
        raise AssertionError(f"{what}: NaN mismatch at {idx}: {actual_f[idx]} vs {expected_f[idx]}")
    both = ~expected_f.isnan()
    diff = (actual_f - expected_f).abs().where(both, 0)
    inf_equal = (actual_f == expected_f) & both
    bound = atol + rtol * expected_f.abs()
    bad = (diff > bound) & ~inf_equal
    if bad.any():
        excess = torch.where(bad, diff - bound, 0)
        idx = tuple(int(i) for i in (excess == excess.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {actual.numel()} elements differ; worst at {idx}: "
            f"{actual_f[idx].item()!r} vs {expected_f[idx].item()!r} (atol={atol}, rtol={rtol})"
        )
