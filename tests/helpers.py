"""Shared test helpers: which backends to test, tolerances, and comparisons that explain."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedce.kernels import _load, available_backends
from fusedce.testing.compare import ulp


# Kernel-vs-reference tolerances, by the dtype the compared values are in. An element passes when
#     |actual - expected| <= ulps * ulp_dtype(expected) + scale_eps * max|expected|.
# Both sides compute in float32 (float64 for float64) and round once to the output dtype. They
# differ by which neighbour that final rounding picks (1 ulp in the half types; float32 and
# float64 round a few times at the result's own size: 4 ulps), and by the order of their sums: a
# log-sum-exp over the tests' up to 1500 classes of logits up to about 10 is near 16, and its error
# of a few eps times that reaches every exp(x - lse) and every difference of such terms, at the
# tensor's scale: 16 epsilons of the compute precision times the tensor's largest element.
class Ulps(NamedTuple):
    ulps: float
    scale_eps: float
    dtype: torch.dtype  # the dtype of the values this tolerance is for


_F32_EPS, _F64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
TOLERANCES = {
    "kernel": {
        torch.float64: Ulps(4, 16 * _F64_EPS, torch.float64),
        torch.float32: Ulps(4, 16 * _F32_EPS, torch.float32),
        torch.bfloat16: Ulps(1, 16 * _F32_EPS, torch.bfloat16),
        torch.float16: Ulps(1, 16 * _F32_EPS, torch.float16),
    },
}


def kernel_backends() -> list:
    """One pytest param per fused backend that can run on CPU tensors here. The reference is the
    expected value in these tests, so it is not among them."""
    return [pytest.param(_load(name), id=name) for name in available_backends("cpu") if name != "reference"]


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    """Equal NaNs, equal infinities, and finite elements within ``tol``: an ``Ulps`` of
    ``TOLERANCES`` (the one of ``actual``'s dtype, when the kernel returns another dtype than the
    input's, such as a float32 loss for half input), or a plain ``(atol, rtol)`` pair, bound
    ``atol + rtol * |expected|``. A failure names the worst element."""
    if isinstance(tol, Ulps) and tol.dtype != actual.dtype:
        tol = TOLERANCES["kernel"].get(actual.dtype, tol)
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


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched while it is active. Under a dispatch mode fusedce
    calls its registered torch.library ops, so its kernels show up here as fusedce.* ops."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket).removeprefix("torch.ops."))
        return func(*args, **(kwargs or {}))


def lane_hostile_rows(classes: int) -> torch.Tensor:
    """Rows that tell row_lse's per-lane statistics apart from a plain sum: an offset, ties within
    and across lanes, -inf masks, a confident row, and +inf or NaN arriving after -inf."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, classes, generator=gen) * 2
    x[0] += 3000.0  # a large common offset
    x[1] = 0.5  # every class tied
    x[2, ::2] = float("-inf")
    x[3, 17] += 40.0  # confident: the rest is ~1e-17
    x[4, classes // 2 :] = float("-inf")
    x[5, 3] = x[5, classes - 1] = x[5].max() + 1  # a tie at the max, in two lanes
    x[6] = float("-inf")
    x[7, classes - 5] = float("inf")  # a late +inf
    x[8, 1] = x[8, 2] = float("inf")  # +inf in two lanes
    x[9, : classes // 2] = float("-inf")
    x[9, classes - 3] = float("nan")  # NaN where its lane had seen only -inf
    x[10, 0] = float("-inf")  # -inf then finite values in one lane
    return x
