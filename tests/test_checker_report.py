"""The report's diagnosis: failures grouped by kind, with the argument values they share."""

from __future__ import annotations

import torch

from fusedce import testing


def _report(fails) -> testing.Report:
    cases = [c for c in testing.default_grid(("cross_entropy",), (torch.float32,)) if c.shape == (123, 7)]
    report = testing.Report()
    for case in cases:
        problems = fails(case)
        report.results.append(testing.CaseResult(case, "cpu@cpu", tuple(problems)))
    return report


def test_diagnosis_names_the_shared_argument():
    report = _report(lambda c: ["value: 1 of 1 elements; worst at ()"] if c.label_smoothing else [])
    n = len(report.failures)
    line = report.diagnosis()
    assert f"{n} failures of kind 'value': all have label_smoothing > 0" in line
    assert f"every case with label_smoothing > 0 fails ({n} cases)" in line


def test_diagnosis_groups_by_exception():
    report = _report(lambda c: ["error: IndexError: Target 7 vs torch none raised"] if c.target == "prob" else [])
    line = report.diagnosis()
    assert "failures of kind 'error: IndexError vs torch none raised': all have target=prob" in line


def test_diagnosis_without_failures():
    assert _report(lambda c: []).diagnosis() == "diagnosis: every case passed"
