"""The triton backend's fused ``ce_reduced_forward``/``ce_reduced_backward`` (the plain (N, C)
'mean'/'sum' loss in one launch each way, ``kernels/triton/reduced.py``) against the composite
that ``_ops`` builds from the reference backend: every dtype, both reductions, ignored rows, no
kept row at all, one program and many, repeated calls (the ticket counter must be back at 0 after
each, and the fixed-order fold must give the same bits).

These run on CPU tensors under ``TRITON_INTERPRET=1`` and are skipped otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedce
from fusedce import _ops
from fusedce.kernels import _load, available_backends, reference, use_backend

from .helpers import TOLERANCES, assert_close_report

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("cpu"),
    reason="the triton backend runs on CPU tensors only under TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rows, classes) -> programs under the interpreter's tiling: one row per program across three
# column blocks, many rows per program in ten programs, and a single program.
SHAPES = {(37, 1500): 37, (300, 10): 10, (5, 3): 1}


@pytest.fixture
def triton_backend():
    return _load("triton")


def _inputs(rows, classes, dtype, ignore_index=-100, every=4):
    gen = torch.Generator().manual_seed(rows * 1000 + classes)
    x = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::every] = ignore_index
    return x, target


def _check(backend, x, target, ignore_index, mean, grad_scale=1.7):
    """The fused results against the reference composite, and the row stats and gradient against
    the triton composite bit for bit (the same row arithmetic in both)."""
    tol = TOLERANCES["kernel"][x.dtype]
    loss, stats, denominator = backend.ce_reduced_forward(x, target, ignore_index, mean)
    ref_loss, ref_stats, ref_denominator = _ops._ce_reduced_forward(reference, x, target, ignore_index, mean)
    _, same_stats, _ = _ops._ce_reduced_forward(backend, x, target, ignore_index, mean)
    assert (loss.dtype, loss.shape) == (x.dtype, ())
    assert (stats.dtype, stats.shape) == (ref_stats.dtype, ref_stats.shape)
    assert (denominator.dtype, denominator.shape) == (ref_denominator.dtype, ())
    assert torch.equal(denominator, ref_denominator)
    assert_close_report(loss, ref_loss, tol, "loss")
    assert_close_report(stats, ref_stats, tol, "stats")
    assert torch.equal(stats, same_stats)

    grad_out = torch.tensor(grad_scale, dtype=x.dtype)
    grad = backend.ce_reduced_backward(grad_out, x, target, stats, denominator, ignore_index)
    ref_grad = _ops._ce_reduced_backward(reference, grad_out, x, target, ref_stats, ref_denominator, ignore_index)
    same_grad = _ops._ce_reduced_backward(backend, grad_out, x, target, stats, denominator, ignore_index)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    assert_close_report(grad, ref_grad, tol, "grad")
    assert torch.equal(grad, same_grad)
    return loss, stats, denominator, grad


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{r}x{c}" for r, c in SHAPES])
def test_matches_the_composite(triton_backend, shape, dtype, mean):
    from fusedce.kernels.triton import reduced

    rows, classes = shape
    x, target = _inputs(rows, classes, dtype)
    assert reduced._tiling(rows, classes, (x.stride(1),), x.element_size(), "cpu", None).grid == SHAPES[shape]
    _, _, denominator, _ = _check(triton_backend, x, target, -100, mean)
    kept = int((target != -100).sum())
    assert denominator.item() == (kept if mean else 1)


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_all_rows_ignored(triton_backend, mean):
    """'mean' of no row is 0/0 = NaN, as torch gives; 'sum' is 0. The gradient is 0 either way."""
    x, target = _inputs(300, 10, torch.float32)
    target.fill_(3)
    loss, _, denominator, grad = _check(triton_backend, x, target, 3, mean)
    assert math.isnan(loss.item()) if mean else loss.item() == 0.0
    assert denominator.item() == (0.0 if mean else 1.0)
    assert not grad.any()
    torch_loss = torch.nn.functional.cross_entropy(x, target, ignore_index=3, reduction="mean" if mean else "sum")
    assert torch.equal(loss.isnan(), torch_loss.isnan())


def test_strided_inputs_and_ignore_index_in_range(triton_backend):
    """A transposed (N, C) view and a strided target; an ignore_index that is a valid class."""
    x_t, target = _inputs(64, 40, torch.float32, ignore_index=0, every=3)
    x = x_t.t().contiguous().t()
    assert x.stride() == (1, 64)
    _check(triton_backend, x, target[::1].repeat_interleave(2)[::2], 0, True)


def test_repeated_calls_are_bit_identical_and_reset_the_counter(triton_backend):
    """The last program resets the ticket counter: a second call must draw tickets from 0 again
    (a counter left at N programs would make no program the last, and leave the loss unwritten)."""
    from fusedce.kernels.triton import reduced

    x, target = _inputs(37, 1500, torch.float32)
    first = triton_backend.ce_reduced_forward(x, target, -100, True)
    counter = reduced._counter(x)
    assert counter.item() == 0
    second = triton_backend.ce_reduced_forward(x, target, -100, True)
    assert counter.item() == 0
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # Another shape (another grid) after it, on the same counter.
    _check(triton_backend, *_inputs(300, 10, torch.float32), -100, True)
    assert counter.item() == 0


def test_degenerate_shapes_take_the_composite(triton_backend):
    """No rows: the 'mean' is NaN and the 'sum' 0. No classes (every target ignored): the same."""
    for rows, classes in ((0, 5), (4, 0)):
        x = torch.zeros(rows, classes)
        target = torch.full((rows,), -100)
        for mean in (True, False):
            loss, stats, denominator = triton_backend.ce_reduced_forward(x, target, -100, mean)
            ref = _ops._ce_reduced_forward(reference, x, target, -100, mean)
            assert torch.equal(loss.isnan(), ref[0].isnan()) and (loss.isnan() | (loss == ref[0])).all()
            assert stats.shape == ref[1].shape and torch.equal(denominator, ref[2])
            grad = triton_backend.ce_reduced_backward(torch.tensor(1.0), x, target, stats, denominator, -100)
            assert grad.shape == x.shape


def test_out_of_bounds_target_raises_on_the_host(triton_backend):
    x, target = _inputs(8, 5, torch.float32)
    target[2] = 5
    with pytest.raises(IndexError, match=r"Target 5 is out of bounds\."):
        triton_backend.ce_reduced_forward(x, target, -100, True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_functional_call_matches_torch(reduction):
    """fusedce.cross_entropy on the triton backend (its fast path) against torch's own loss."""
    x, target = _inputs(300, 10, torch.float32)
    x.requires_grad_(True)
    with use_backend("triton"):
        loss = fusedce.cross_entropy(x, target, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, x)
    expected = torch.nn.functional.cross_entropy(x.double(), target, reduction=reduction)
    (expected_grad,) = torch.autograd.grad(expected, x)
    tol = TOLERANCES["kernel"][torch.float32]
    assert_close_report(loss, expected.float(), tol, "loss")
    assert_close_report(grad, expected_grad, tol, "grad")
