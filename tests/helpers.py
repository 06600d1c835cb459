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


def layouts(shape: tuple[int, int, int], dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The same (outer, C, inner) values in the three layouts the kernels must handle."""
    outer, classes, inner = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    base = torch.randn(outer, classes, inner, generator=gen, dtype=torch.float64) * 3
    contiguous = base.to(dtype)
    # Classes innermost in memory: the channels-last case of a K-dimensional input.
    class_last = base.permute(0, 2, 1).contiguous().permute(0, 2, 1).to(dtype)
    # Every other element of a wider buffer: strided in every dim.
    wide = torch.randn(outer, classes * 2, inner, generator=gen, dtype=torch.float64)
    wide[:, ::2] = base
    strided = wide.to(dtype)[:, ::2]
    return [("contiguous", contiguous), ("class_last", class_last), ("strided", strided)]


def targets_with_ignored(shape: tuple[int, int, int], ignore_index: int) -> torch.Tensor:
    """(outer, inner) index targets, every third one ``ignore_index``."""
    outer, classes, inner = shape
    gen = torch.Generator().manual_seed(7)
    target = torch.randint(0, classes, (outer, inner), generator=gen)
    target.view(-1)[::3] = ignore_index
    return target
