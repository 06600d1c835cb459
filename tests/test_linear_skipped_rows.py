"""Rows whose targets are all ignore_index skip their matmuls (fusedce.linear.rows), exactly.

torch gives such a row a zero loss and a zero gradient unless its logits are non-finite, when
NaN flows through its gradient; these tests hold fusedce to both, in every pass that skips.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce.kernels import available_backends, use_backend
from fusedce.linear.rows import computed_rows

Options = torch.nn.LinearCrossEntropyOptions
ROWS, HIDDEN, CLASSES = 11, 6, 9


def _inputs(dtype=torch.float32, bias=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(CLASSES, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(CLASSES, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    target[::3] = -100
    return x, w, b, target


def _run(fn, x, w, b, target, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], target, linear_bias=leaves[2] if b is not None else None, **kwargs)
    loss.sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_same(ours, theirs, dtype):
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True, **tol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def test_ignored_rows_are_skipped_only_when_their_logits_are_surely_finite():
    x, w, b, target = _inputs(bias=True)
    kept = computed_rows(x, w, b, target.view(-1, 1), False, -100)
    assert kept is not None and kept.tolist() == [i for i in range(ROWS) if i % 3]
    assert computed_rows(x, w, b, target.view(-1, 1), True, -100) is None  # probability target
    assert computed_rows(x, w, b, torch.zeros(ROWS, 1, dtype=torch.long), False, -100) is None  # none ignored
    nan_row = x.clone()
    nan_row[3, 2] = float("nan")
    assert computed_rows(nan_row, w, b, target.view(-1, 1), False, -100) is None
    overflowing = x.clone()
    overflowing[0] = 1e37  # finite, but its logits overflow float32
    assert computed_rows(overflowing, w, b, target.view(-1, 1), False, -100) is None
    inf_bias = b.clone()
    inf_bias[4] = float("inf")
    assert computed_rows(x, w, inf_bias, target.view(-1, 1), False, -100) is None


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("poison", [None, "nan", "overflow"])
def test_skipping_ignored_rows_matches_torch(backend, dtype, reduction, poison):
    x, w, b, target = _inputs(dtype, bias=True)
    if poison == "nan":
        x[3, 1] = float("nan")  # an ignored row: torch's gradients turn NaN through it
    elif poison == "overflow":
        x[6] = torch.finfo(dtype).max / 4  # an ignored row whose logits overflow to ±inf
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    expected = _run(F.linear_cross_entropy, x, w, b, target, **kwargs)
    with use_backend(backend):
        got = _run(fusedce.linear_cross_entropy, x, w, b, target, options=Options(batch_chunk_size=3), **kwargs)
    _assert_same(got, expected, dtype)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_every_row_ignored_matches_torch(backend):
    x, w, b, target = _inputs(bias=True)
    target.fill_(-100)
    expected = _run(F.linear_cross_entropy, x, w, b, target)
    with use_backend(backend):
        got = _run(fusedce.linear_cross_entropy, x, w, b, target, options=Options(batch_chunk_size=4))
    _assert_same(got, expected, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_ad_over_skipped_rows_matches_torch(reduction):
    x, w, b, target = _inputs(torch.float64, bias=True)
    x[0] *= 1000  # an ignored row with large logits: it needs its true lse, not a placeholder
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))

    def loss(fn, **kwargs):
        return lambda x, w, b: fn(x, w, target, linear_bias=b, reduction=reduction, **kwargs)

    _, expected = torch.func.jvp(loss(F.linear_cross_entropy), (x, w, b), tangents)
    _, got = torch.func.jvp(loss(fusedce.linear_cross_entropy, options=Options(batch_chunk_size=4)), (x, w, b),
                            tangents)
    torch.testing.assert_close(got, expected)
