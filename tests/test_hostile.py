"""The hostile special cases of the public checker (``fusedce.testing.hostile``): they are in the
default grid, build the values they promise, pass for torch itself, and catch a candidate that
is not shift-invariant. fusedce runs them on every backend in test_parity's special cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedce import testing
from fusedce.testing import hostile
from fusedce.testing.grid import build_inputs

HOSTILE = [c for op in hostile.HOSTILE_OPS for c in hostile.hostile_cases(op)]


def test_every_hostile_case_is_in_the_default_grid_in_every_dtype():
    grid = set(testing.default_grid())
    assert HOSTILE and set(HOSTILE) <= grid
    assert {c.special for c in HOSTILE} == set(hostile.HOSTILE_SPECIALS)
    assert {c.dtype for c in HOSTILE} == set(testing.DTYPES)
    assert {c.op for c in HOSTILE} == set(hostile.HOSTILE_OPS)
    assert set(testing.OPS) - set(hostile.HOSTILE_OPS) == {"linear_cross_entropy"}


def test_hostile_cases_refuse_an_op_they_do_not_build():
    with pytest.raises(ValueError, match="no hostile cases for 'linear_cross_entropy'"):
        list(hostile.hostile_cases("linear_cross_entropy"))


def _rows(x: torch.Tensor, class_dim: int) -> torch.Tensor:
    return x.detach().movedim(class_dim, -1).reshape(-1, x.shape[class_dim])


def test_the_recipes_build_the_values_they_promise():
    for case in HOSTILE:
        inputs = build_inputs(case)
        x = inputs.input.detach().double()
        if case.special == "common_offset":
            assert x.mean() > hostile.OFFSETS[case.dtype] / 2, case.id
        elif case.special == "neg_inf_mask":
            rows = _rows(x, case.class_dim)
            assert rows[0].eq(-torch.inf).all() and rows[-1].eq(-torch.inf).all(), case.id
            assert rows[1:-1].isfinite().any(), case.id
        elif case.special == "nan_logits":
            assert x.isnan().any() and _rows(x, case.class_dim).isnan().any(1).logical_not().any(), case.id
        elif case.special == "uint8_wrapping_target":
            wrapped = (-100 if case.ignore_index is None else case.ignore_index) % 256
            assert inputs.target.dtype == torch.uint8 and (inputs.target == wrapped).any(), case.id
            assert wrapped in (156, 112)
        elif case.special == "uint8_empty_batch":
            assert inputs.target.dtype == torch.uint8 and x.shape[0] == 0 and x.dim() >= 3, case.id
        elif case.special == "confident_prob_target":
            loss = F.cross_entropy(x, inputs.target.detach().double(), reduction="none")
            assert 0 < loss.max() < 1e-3, case.id


def test_torch_passes_its_own_hostile_cases():
    """The cases run end to end through the checker (a case the checker cannot judge fails)."""
    report = testing.check(testing.TORCH_FUNCTIONS, HOSTILE, label="torch")
    assert report.ok, report.details(10)


def test_a_candidate_that_forms_lse_first_fails_the_offset_cases():
    """log_softmax as ``x - (max + log Σ exp(x - max))``: exact in real numbers, but the rounded
    lse loses the low digits of every log-probability under a large common offset."""

    def lse_first(input, dim=None, _stacklevel=3, dtype=None):
        x = input if dtype is None else input.to(dtype)
        row_max = x.amax(dim, keepdim=True).detach()
        return x - (row_max + (x - row_max).exp().sum(dim, keepdim=True).log())

    cases = [c for c in HOSTILE if c.op == "log_softmax" and c.special == "common_offset"]
    report = testing.check(lse_first, cases, label="lse_first")
    failed = {r.case.dtype for r in report.results if r.problems}
    assert torch.float32 in failed and torch.float64 in failed, report.details(4)
    assert testing.check(F.log_softmax, cases).ok


class _ProbTargetCrossEntropy(torch.autograd.Function):
    """cross_entropy with a probability target and reduction='none', its logits' gradient
    ``g·(Σt·p - t)`` by hand, with the probabilities below ``flush`` set to zero."""

    @staticmethod
    def forward(ctx, x, target, flush):
        ctx.save_for_backward(x, target)
        ctx.flush = flush
        return F.cross_entropy(x, target, reduction="none")

    @staticmethod
    def backward(ctx, grad):
        x, target = ctx.saved_tensors
        p = x.softmax(1)
        p = p.masked_fill(p < ctx.flush, 0)
        g = grad.unsqueeze(1)
        return g * (target.sum(1, keepdim=True) * p - target), -g * x.log_softmax(1), None


def test_the_confident_cases_still_catch_a_lost_small_probability():
    """The logits' gradient of a confident row is a difference of much larger terms, and the
    rule allows eps times their size (testing.cancellation); a kernel that flushes the small
    probabilities (about 1e-9 here) to zero still fails, and the same formula without the flush
    passes."""
    cases = [c for c in HOSTILE if c.special == "confident_prob_target" and c.reduction == "none"
             and c.dtype in (torch.float32, torch.float64)]
    assert cases

    def candidate(flush):
        def cross_entropy(input, target, **kwargs):
            assert kwargs == {"reduction": "none"}, kwargs
            return _ProbTargetCrossEntropy.apply(input, target, flush)

        return cross_entropy

    assert testing.check(candidate(0.0), cases, label="by hand").ok
    report = testing.check(candidate(1e-4), cases, label="flushed")
    assert all(r.problems and "grad 0" in r.problems[0] for r in report.results), report.details(4)
