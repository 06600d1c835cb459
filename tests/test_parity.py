"""The whole stack against torch, over the parity grid, on every backend available here.

The default run takes every special case and a deterministic sample of the argument product;
``--full-grid`` runs all of it (as ``python -m fusedce check`` does).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from fusedce import functional, testing, use_backend
from fusedce.kernels import available_backends
from fusedce.testing import grid
from fusedce.testing.hostile import HOSTILE_SPECIALS

GRID = testing.default_grid()
CANDIDATES = {op: getattr(functional, op) for op in testing.OPS}
# 1 in N of the argument product per backend in the default run (the interpreter is slow).
SAMPLE_EVERY = {"reference": 6, "cpu": 3, "triton": 60}
BACKENDS = available_backends("cpu")

PRODUCT_GROUPS = sorted(
    {(c.op, c.shape, c.dtype) for c in GRID if not c.special},
    key=lambda k: (k[0], len(k[1]), k[1], str(k[2])),
)


def _run(backend: str, cases: list[testing.Case]) -> None:
    with use_backend(backend):
        report = testing.check(CANDIDATES, cases, label=backend)
    assert report.ok, f"{report.summary()}\n{report.details(15)}"


def _product(op, shape, dtype):
    return [c for c in GRID if (c.op, c.shape, c.dtype) == (op, shape, dtype) and not c.special]


def _group_id(group) -> str:
    op, shape, dtype = group
    return f"{op}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", PRODUCT_GROUPS, ids=_group_id)
def test_argument_product_sample(backend, group):
    everything = _product(*group)
    _run(backend, testing.sample(everything, SAMPLE_EVERY[backend]) or everything[:1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", PRODUCT_GROUPS, ids=_group_id)
def test_argument_product_full(backend, group):
    _run(backend, _product(*group))


# The default run takes every float32 special case and 1 in this many of the other dtypes'.
SPECIAL_SAMPLE_EVERY = 6


def _specials(op: str, full: bool) -> list[testing.Case]:
    cases = [c for c in GRID if c.op == op and c.special]
    if full:
        return cases
    return [c for c in cases if c.dtype == torch.float32] + testing.sample(
        [c for c in cases if c.dtype != torch.float32], SPECIAL_SAMPLE_EVERY
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", testing.OPS)
def test_special_cases(backend, op):
    """Degenerate values, every invalid input, and the legacy arguments."""
    _run(backend, _specials(op, full=False))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", testing.OPS)
def test_special_cases_every_dtype(backend, op):
    _run(backend, _specials(op, full=True))


def test_grid_size_is_exact():
    """The grid's size, op by op: a refactor that drops (or adds) cases must say so here."""
    hostile = set(HOSTILE_SPECIALS)
    counts = {op: (sum(c.op == op and not c.special for c in GRID),
                   sum(c.op == op and bool(c.special) and c.special not in hostile for c in GRID),
                   sum(c.op == op and c.special in hostile for c in GRID))
              for op in testing.OPS}
    assert counts == {
        # op: (argument product, special cases = 4 dtypes x the float32 specials, hostile cases)
        "cross_entropy": (14256, 4 * 1342, 140),
        "nll_loss": (2376, 4 * 515, 84),
        "log_softmax": (240, 4 * 36, 22),
        "softmax": (240, 4 * 36, 22),
        # its own grid (testing.linear_grid): the product, then torch's checks and degenerate inputs
        "linear_cross_entropy": (439, 50, 0),
    }
    assert len(GRID) == 25585 == len({c.id for c in GRID})


def test_every_special_case_is_tagged_and_in_every_dtype():
    """--quick and the samples keep every special case by its tag, so an untagged one would be
    silently dropped; and each runs in all four float dtypes, filtered by ``dtypes``."""
    for op in testing.OPS:
        specials = list(grid.special_cases(op))
        assert all(c.special in grid.SPECIALS for c in specials)
        by_base: dict[testing.Case, set[torch.dtype]] = {}
        for c in specials:
            by_base.setdefault(replace(c, dtype=torch.float32), set()).add(c.dtype)
        assert all(dtypes == set(testing.DTYPES) for dtypes in by_base.values())
    half = testing.default_grid(dtypes=(torch.float16,))
    assert half and all(c.dtype == torch.float16 for c in half)

    def tagged(cases: list[testing.Case]) -> int:  # grid.special_cases' own (hostile.py picks its dtypes)
        return sum(bool(c.special) and c.special in grid.SPECIALS and c.special not in HOSTILE_SPECIALS
                   and c.op in grid.LOSS_OPS + grid.SOFTMAX_OPS for c in cases)

    assert tagged(half) == tagged(GRID) // 4


def test_grid_covers_the_issue_axes():
    """The grid really spans the axes it claims (so a refactor cannot quietly shrink it)."""
    ce = list(grid.loss_cases("cross_entropy"))
    assert set(ce) <= set(GRID)
    axes = {
        "shape": {c.shape for c in ce},
        "dtype": {c.dtype for c in ce},
        "layout": {c.layout for c in ce},
        "target": {c.target for c in ce},
        "weight": {c.weight for c in ce},
        "ignore_index": {c.ignore_index for c in ce},
        "reduction": {c.reduction for c in ce},
        "label_smoothing": {c.label_smoothing for c in ce},
    }
    assert {len(s) for s in (axes["weight"], axes["ignore_index"], axes["reduction"], axes["label_smoothing"])} == {3}
    assert axes["target"] == {"index", "prob"} and axes["layout"] == {"contiguous", "class_last", "strided"}
    assert len(axes["dtype"]) == 4
    assert any(len(s) == 1 for s in axes["shape"]) and any(len(s) >= 4 for s in axes["shape"])
    assert max(s[1] for s in axes["shape"] if len(s) > 1) > 2048  # above one kernel column block
    n_product = len(list(itertools.product(*axes.values())))
    assert len(ce) > n_product // 10  # every shape/dtype gets the whole argument product


def test_checker_catches_a_wrong_candidate():
    """The checker itself can fail: a candidate that ignores label_smoothing is caught."""

    def sloppy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
               reduction="mean", label_smoothing=0.0):
        return functional.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction)

    cases = [c for c in GRID if c.op == "cross_entropy" and c.label_smoothing == 0.1][:20]
    report = testing.check(sloppy, cases, label="sloppy")
    assert not report.ok
    assert "FAILED [sloppy]" in report.details()
