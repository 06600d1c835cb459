"""The public parity checker: prove that a loss behaves exactly like torch's.

    from fusedce import testing
    report = testing.check(my_cross_entropy, testing.default_grid(ops=("cross_entropy",)))
    assert report.ok, report.details()

A candidate is any callable with the signature of the torch function it replaces, or a mapping
from op name ("cross_entropy", "nll_loss", "log_softmax", "softmax") to such callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.nn import functional as torch_functional

from .compare import TOLERANCES, Tolerance, compare
from .grid import DTYPES, OPS, Case, Inputs, build_inputs, default_grid, sample, special_cases
from .report import CaseResult, Report

__all__ = [
    "DTYPES",
    "OPS",
    "TOLERANCES",
    "TORCH_FUNCTIONS",
    "Case",
    "CaseResult",
    "Inputs",
    "Report",
    "Tolerance",
    "build_inputs",
    "check",
    "check_case",
    "default_grid",
    "sample",
    "special_cases",
]

TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "cross_entropy": torch_functional.cross_entropy,
    "nll_loss": torch_functional.nll_loss,
    "log_softmax": torch_functional.log_softmax,
    "softmax": torch_functional.softmax,
    "linear_cross_entropy": torch_functional.linear_cross_entropy,
}


def check_case(candidate: Callable[..., Any], case: Case, device: str | torch.device = "cpu") -> list[str]:
    """The problems of one candidate on one case, compared with torch's function for its op."""
    return compare(case, candidate, TORCH_FUNCTIONS[case.op], device)


def check(
    candidate: Callable[..., Any] | Mapping[str, Callable[..., Any]],
    cases: Iterable[Case],
    *,
    label: str = "candidate",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Run every case whose op the candidate covers, and report the differences from torch."""
    chosen = [c for c in cases if not isinstance(candidate, Mapping) or c.op in candidate]
    report = Report()
    for i, case in enumerate(chosen):
        fn = candidate[case.op] if isinstance(candidate, Mapping) else candidate
        report.results.append(CaseResult(case, label, tuple(check_case(fn, case, device))))
        if progress is not None:
            progress(i + 1, len(chosen))
    return report
