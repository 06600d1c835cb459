"""Every backend's kernels against the reference kernels, called directly in canonical form.

The public parity suite (test_parity.py) compares the whole stack with torch; this file pins a
kernel failure to one function and one layout.
"""

from __future__ import annotations

import pytest
import torch

from fusedce.kernels import reference

from .helpers import TOLERANCES, assert_close_report, kernel_backends, layouts, targets_with_ignored

SHAPES = [(1, 7, 1), (5, 123, 1), (3, 9, 7), (2, 1500, 3)]  # 1500 > one column block
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seeded():
    """Targets, weights and upstream gradients are the same on every run."""
    GEN.manual_seed(0)


GEN = torch.Generator()


CASES = [
    pytest.param(w, ig, eps, id=f"w={w}-ignore={ig}-eps={eps}")
    for w in (False, True)
    for ig in (-100, 2)
    for eps in (0.0, 0.1)
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("use_weight", "ignore_index", "smoothing"), CASES)
def test_ce_index(backend, dtype, shape, use_weight, ignore_index, smoothing):
    for layout, x in layouts(shape, dtype):
        target = targets_with_ignored(shape, ignore_index)
        weight = torch.rand(shape[1], generator=GEN, dtype=torch.float64).to(dtype) if use_weight else None
        loss, lse = backend.ce_forward(x, target, weight, ignore_index, smoothing)
        ref_loss, ref_lse = reference.ce_forward(x, target, weight, ignore_index, smoothing)
        tol = TOLERANCES["kernel"][dtype]
        assert_close_report(loss, ref_loss, tol, f"loss {layout}")
        assert_close_report(lse, ref_lse, tol, f"lse {layout}")

        grad_loss = torch.rand(shape[0], shape[2], generator=GEN, dtype=ref_lse.dtype)
        grad = backend.ce_backward(grad_loss, x, target, weight, lse, ignore_index, smoothing, False)
        ref = reference.ce_backward(grad_loss, x, target, weight, ref_lse, ignore_index, smoothing, False)
        assert grad.dtype == dtype
        assert_close_report(grad, ref, tol, f"grad {layout}")

        # A broadcast upstream gradient (the 'mean' case), written into x itself.
        scalar = torch.tensor(0.5, dtype=ref_lse.dtype).expand(shape[0], shape[2])
        x_copy = x.clone()
        out = backend.ce_backward(scalar, x_copy, target, weight, lse, ignore_index, smoothing, True)
        assert out.data_ptr() == x_copy.data_ptr()
        ref = reference.ce_backward(scalar, x, target, weight, ref_lse, ignore_index, smoothing, False)
        assert_close_report(x_copy, ref, tol, f"inplace grad {layout}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_ce_prob(backend, dtype, shape, use_weight, smoothing):
    for layout, x in layouts(shape, dtype):
        target = torch.softmax(torch.randn(shape, generator=GEN, dtype=torch.float64), 1).to(dtype)
        weight = torch.rand(shape[1], generator=GEN, dtype=torch.float64).to(dtype) if use_weight else None
        loss, lse = backend.ce_prob_forward(x, target, weight, smoothing)
        ref_loss, ref_lse = reference.ce_prob_forward(x, target, weight, smoothing)
        tol = TOLERANCES["kernel"][dtype]
        assert_close_report(loss, ref_loss, tol, f"loss {layout}")
        assert_close_report(lse, ref_lse, tol, f"lse {layout}")
        grad_loss = torch.rand(shape[0], shape[2], generator=GEN, dtype=ref_lse.dtype)
        grad = backend.ce_prob_backward(grad_loss, x, target, weight, lse, smoothing, False)
        ref = reference.ce_prob_backward(grad_loss, x, target, weight, ref_lse, smoothing, False)
        assert_close_report(grad, ref, tol, f"grad {layout}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use_weight", [False, True])
def test_nll(backend, dtype, shape, use_weight):
    for layout, x in layouts(shape, dtype):
        target = targets_with_ignored(shape, 1)
        weight = torch.rand(shape[1], generator=GEN, dtype=torch.float64).to(dtype) if use_weight else None
        loss = backend.nll_forward(x, target, weight, 1)
        tol = TOLERANCES["kernel"][dtype]
        assert_close_report(loss, reference.nll_forward(x, target, weight, 1), tol, f"loss {layout}")
        grad_loss = torch.rand(shape[0], shape[2], generator=GEN, dtype=loss.dtype)
        grad = backend.nll_backward(grad_loss, target, weight, 1, shape[1], dtype)
        ref = reference.nll_backward(grad_loss, target, weight, 1, shape[1], dtype)
        assert grad.dtype == dtype
        assert_close_report(grad, ref, tol, f"grad {layout}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", ["log_softmax", "softmax"])
def test_softmax_family(backend, dtype, shape, op):
    forward, backward = f"{op}_forward", f"{op}_backward"
    for layout, x in layouts(shape, dtype):
        out = getattr(backend, forward)(x)
        ref = getattr(reference, forward)(x)
        tol = TOLERANCES["kernel"][dtype]
        assert out.dtype == dtype and out.is_contiguous()
        assert_close_report(out, ref, tol, f"out {layout}")
        grad_out = torch.randn(shape, generator=GEN, dtype=torch.float64).to(dtype)
        grad = getattr(backend, backward)(grad_out, ref)
        assert_close_report(grad, getattr(reference, backward)(grad_out, ref), tol, f"grad {layout}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("fn", ["ce_forward", "nll_forward"])
def test_target_out_of_bounds(backend, fn):
    if not getattr(backend, "CHECKS_TARGETS", True):
        pytest.skip("this backend documents that it does not check targets on the host")
    x = torch.randn(4, 5, 1, generator=GEN)
    target = torch.tensor([[0], [1], [7], [-3]])
    args = (x, target, None, -100, 0.0) if fn == "ce_forward" else (x, target, None, -100)
    with pytest.raises(IndexError, match=r"^Target 7 is out of bounds\.$"):
        getattr(backend, fn)(*args)


@pytest.mark.parametrize("backend", kernel_backends())
def test_non_finite_rows(backend):
    """All -inf rows and rows with +inf or NaN are NaN everywhere; a -inf logit away from the
    target is harmless."""
    x = torch.randn(5, 6, 1, generator=GEN)
    x[0] = float("-inf")
    x[1, 2] = float("inf")
    x[2, 3] = float("nan")
    x[3, 4] = float("-inf")
    target = torch.tensor([[0], [1], [2], [0], [1]])
    loss, _lse = backend.ce_forward(x, target, None, -100, 0.0)
    ref_loss, _ref_lse = reference.ce_forward(x, target, None, -100, 0.0)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    assert loss[:3].isnan().all() and loss[3:].isfinite().all()
    out = backend.log_softmax_forward(x)
    assert out[:3].isnan().all() and torch.equal(out[3, 4], torch.tensor([float("-inf")]))
