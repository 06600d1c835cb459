"""Shared test helpers: which backends to test, tolerances, and comparisons that explain."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from fusedce.kernels import _load, available_backends
from fusedce.testing.compare import ulp


# Kernel-vs-reference tolerances: (ulps, scale_eps). An element passes when
#     |actual - expected| <= ulps * ulp_dtype(expected) + scale_eps * max|expected|.
# Both sides compute in float32 (float64 for float64) and round once to the output dtype, so they
# differ by the summation order (a few float32 roundings at the tensor's scale: scale_eps, 8 float32
# epsilons, about 1e-6 of the largest element) and by which neighbour the final rounding picks
# (1 ulp in the half types; float32's own few roundings of the result: 4 ulps).
class Ulps(NamedTuple):
    ulps: float
    scale_eps: float


TOLERANCES = {
    "kernel": {
        torch.float64: Ulps(4, 8 * torch.finfo(torch.float64).eps),
        torch.float32: Ulps(4, 8 * torch.finfo(torch.float32).eps),
        torch.bfloat16: Ulps(1, 8 * torch.finfo(torch.float32).eps),
        torch.float16: Ulps(1, 8 * torch.finfo(torch.float32).eps),
    },
}


def kernel_backends() -> list:
    """One pytest param per fused backend that can run on CPU tensors here. The reference is the
    expected value in these tests, so it is not among them."""
    return [pytest.param(_load(name), id=name) for name in available_backends("cpu") if name != "reference"]


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    """Equal NaNs, equal infinities, and finite elements within ``tol``: an ``Ulps`` of
    ``TOLERANCES`` (the ulp taken in ``actual``'s dtype), or a plain ``(atol, rtol)`` pair, bound
    ``atol + rtol * |expected|``. A failure names the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual_f, expected_f = actual.double(), expected.double()
    nan_mismatch = actual_f.isnan() != expected_f.isnan()
    if nan_mismatch.any():
        idx = tuple(int(i) for i in nan_mismatch.nonzero()[0])
        raise AssertionError(f"{what}: NaN mismatch at {idx}: {actual_f[idx]} vs {expected_f[idx]}")
    inf_mismatch = (actual_f.isinf() | expected_f.isinf()) & (actual_f != expected_f)
    if inf_mismatch.any():
        idx = tuple(int(i) for i in inf_mismatch.nonzero()[0])
        raise AssertionError(f"{what}: infinity mismatch at {idx}: {actual_f[idx]} vs {expected_f[idx]}")
    finite = expected_f.isfinite()
    if not finite.any():
        return
    scale = expected_f.abs().where(finite, 0).max()
    if isinstance(tol, Ulps):
        bound = tol.ulps * ulp(expected_f, actual.dtype) + tol.scale_eps * scale
        allowed = f"{tol.ulps} ulp of {actual.dtype} + {tol.scale_eps:.3g} of the largest, {scale.item():.3g}"
    else:
        atol, rtol = tol
        bound = atol + rtol * expected_f.abs()
        allowed = f"atol={atol}, rtol={rtol}"
    diff = (actual_f - expected_f).abs().where(finite, 0)
    bad = diff > bound
    if bad.any():
        excess = torch.where(bad, diff - bound, 0)
        idx = tuple(int(i) for i in (excess == excess.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {actual.numel()} elements differ; worst at {idx}: "
            f"{actual_f[idx].item()!r} vs {expected_f[idx].item()!r} (allowed {bound[idx].item():.3g}: {allowed})"
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
