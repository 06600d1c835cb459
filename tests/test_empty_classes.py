"""Degenerate losses torch handles specially, on every backend: no classes (C = 0) with every
target ignored, label smoothing over no classes, and an empty K-dimensional batch with a uint8
target. Each case is compared with torch itself: the value (NaN and signless zero included), the
output's dtype and shape, the gradient's shape, and any exception's type and message, in the
forward or the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import use_backend
from fusedce.kernels import available_backends

BACKENDS = available_backends("cpu")
REDUCTIONS = ("none", "mean", "sum")
_LONG, _BYTE = torch.int64, torch.uint8

# (op, input shape, target, keyword arguments)
CASES = [
    # C = 0, every target ignored: 0 per row, NaN for 'mean' (0/0), 0 for 'sum'.
    ("nll_loss", (0,), torch.tensor(0), {"ignore_index": 0}),
    ("cross_entropy", (0,), torch.tensor(0), {"ignore_index": 0}),
    ("nll_loss", (3, 0), torch.zeros(3, dtype=_LONG), {"ignore_index": 0}),
    ("cross_entropy", (3, 0), torch.zeros(3, dtype=_LONG), {"ignore_index": 0}),
    ("nll_loss", (3, 0), torch.zeros(3, dtype=_LONG), {"ignore_index": 0, "weight": torch.empty(0)}),
    ("cross_entropy", (3, 0), torch.zeros(3, dtype=_LONG), {"ignore_index": 0, "weight": torch.empty(0)}),
    ("cross_entropy", (3, 0, 2, 2), torch.zeros(3, 2, 2, dtype=_LONG), {"ignore_index": 0}),
    # A target that is not ignored has no class to be.
    ("cross_entropy", (3, 0), torch.zeros(3, dtype=_LONG), {}),
    # 3-D and 5-D input: torch views the empty input as (N, 0, 0, 0) and raises a size mismatch.
    ("cross_entropy", (3, 0, 2), torch.zeros(3, 2, dtype=_LONG), {"ignore_index": 0}),
    ("nll_loss", (3, 0, 1, 1, 2), torch.zeros(3, 1, 1, 2, dtype=_LONG), {"ignore_index": 0}),
    # ... after the target dtype and the weight size checks, as in torch.
    ("nll_loss", (1, 0, 1), torch.zeros(1, 1, dtype=torch.int32), {"ignore_index": 0}),
    ("cross_entropy", (3, 0, 2), torch.zeros(3, 2, dtype=_LONG), {"ignore_index": 0, "weight": torch.ones(2)}),
    # Smoothing over no classes: torch scales an empty sum by ε/0 = inf, so NaN everywhere.
    ("cross_entropy", (3, 0), torch.zeros(3, dtype=_LONG), {"ignore_index": 0, "label_smoothing": 0.1}),
    ("cross_entropy", (3, 0, 2, 2), torch.zeros(3, 2, 2, dtype=_LONG), {"ignore_index": 0, "label_smoothing": 0.2}),
    (
        "cross_entropy", (3, 0), torch.zeros(3, dtype=_LONG),
        {"ignore_index": 0, "label_smoothing": 0.1, "weight": torch.empty(0)},
    ),
    ("cross_entropy", (0, 0, 3), torch.zeros(0, 3, dtype=_LONG), {"label_smoothing": 0.1}),
    ("cross_entropy", (0, 0), torch.zeros(0, dtype=_LONG), {"label_smoothing": 0.1}),
    # Probability targets over no classes: empty sums, and no division by C.
    ("cross_entropy", (0, 0), torch.empty(0, 0), {"label_smoothing": 0.1}),
    ("cross_entropy", (3, 0), torch.empty(3, 0), {"label_smoothing": 0.1}),
    # An empty K-dim batch with a uint8 target: the forward returns early, the backward raises.
    ("cross_entropy", (0, 3, 2), torch.empty(0, 2, dtype=_BYTE), {}),
    ("nll_loss", (0, 0, 0), torch.empty(0, 0, dtype=_BYTE), {}),
    ("nll_loss", (0, 5, 2, 2), torch.empty(0, 2, 2, dtype=_BYTE), {}),
    # The weight's dtype is checked before that target is refused.
    ("nll_loss", (0, 0, 0), torch.empty(0, 0, dtype=_BYTE), {"weight": torch.empty(0, dtype=torch.float64)}),
    ("cross_entropy", (0, 3, 2), torch.empty(0, 2, dtype=_BYTE), {"weight": torch.ones(3, dtype=torch.float64)}),
]


def _outcome(module, op, shape, target, kwargs, reduction):
    """What a call and its backward give: the loss and the gradient's shape, or the error."""
    x = torch.empty(shape).requires_grad_()
    try:
        out = getattr(module, op)(x, target.clone(), reduction=reduction, **kwargs)
    except Exception as exc:  # compared with torch's, type and message
        return ("forward error", type(exc), str(exc))
    try:
        (grad,) = torch.autograd.grad(out.sum(), x)
        backward = tuple(grad.shape)
    except Exception as exc:
        backward = ("backward error", type(exc), str(exc))
    return out.detach(), backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("op", "shape", "target", "kwargs"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_degenerate_losses_match_torch(backend, reduction, op, shape, target, kwargs):
    expected = _outcome(F, op, shape, target, kwargs, reduction)
    with use_backend(backend):
        actual = _outcome(fusedce, op, shape, target, kwargs, reduction)
    if isinstance(expected[0], str) or isinstance(actual[0], str):
        assert actual == expected
        return
    (value, backward), (expected_value, expected_backward) = actual, expected
    assert value.dtype == expected_value.dtype and value.shape == expected_value.shape
    torch.testing.assert_close(value, expected_value, equal_nan=True, rtol=0, atol=0)
    assert backward == expected_backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "dim"), [((0,), 0), ((2, 0, 3), 1), ((4, 0), -1)], ids=str)
def test_softmax_over_no_classes_matches_torch(backend, op, shape, dim):
    """An empty class dim: an empty result of the input's shape, and an empty gradient (the
    output must be a new tensor: autograd cannot save an input returned as-is)."""
    x = torch.empty(shape, requires_grad=True)
    with use_backend(backend):
        out = getattr(fusedce, op)(x, dim)
        (grad,) = torch.autograd.grad(out.sum(), x)
    expected = getattr(F, op)(x, dim)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert grad.shape == x.shape
