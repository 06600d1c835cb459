"""The whole stack against torch, over the parity grid, on every backend available here.

The default run takes every special case and a deterministic sample of the argument product;
``--full-grid`` runs all of it (as ``python -m fusedce check`` does).
"""

from __future__ import annotations

import itertools

import pytest

from fusedce import functional, testing, use_backend
from fusedce.kernels import available_backends
from fusedce.testing import grid

GRID = testing.default_grid()
CANDIDATES = {op: getattr(functional, op) for op in testing.OPS}
# 1 in N of the argument product per backend in the default run (the interpreter is slow).
SAMPLE_EVERY = {"reference": 6, "cpu": 3, "triton": 60}
BACKENDS = available_backends("cpu")

PRODUCT_GROUPS = sorted(
    {(c.op, c.shape, c.dtype) for c in GRID if not c.special and not c.extra},
    key=lambda k: (k[0], len(k[1]), k[1], str(k[2])),
)


def _run(backend: str, cases: list[testing.Case]) -> None:
    with use_backend(backend):
        report = testing.check(CANDIDATES, cases, label=backend)
    assert report.ok, f"{report.summary()}\n{report.details(15)}"


def _product(op, shape, dtype):
    return [c for c in GRID if (c.op, c.shape, c.dtype) == (op, shape, dtype) and not c.special and not c.extra]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", testing.OPS)
def test_special_cases(backend, op):
    """Degenerate values, every invalid input, and the legacy arguments."""
    cases = [c for c in GRID if c.op == op and (c.special or c.extra)]
    _run(backend, cases)


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
