"""The parity report: per-case results, a summary table and the first failures in detail."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields

from .grid import Case


@dataclass(frozen=True)
class CaseResult:
    case: Case
    label: str  # what was checked: a backend name, or a candidate's name
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def extend(self, other: Report) -> None:
        self.results.extend(other.results)

    def table(self) -> str:
        """op × label: passed/total, with the failure count when there is one."""
        passed: Counter[tuple[str, str]] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        for r in self.results:
            key = (r.case.op, r.label)
            total[key] += 1
            passed[key] += r.passed
        labels = sorted({label for _, label in total})
        ops = sorted({op for op, _ in total})
        width = max(14, *(len(op) for op in ops))
        # Wide enough for "12345/12345 passed, 12345 FAILED" and the longest label, plus a gap.
        cell = 2 + max(32, *(len(label) for label in labels))
        lines = [f"{'op':<{width}}" + "".join(f"{label:>{cell}}" for label in labels)]
        for op in ops:
            cells = []
            for label in labels:
                t = total[(op, label)]
                if not t:
                    cells.append(f"{'-':>{cell}}")
                    continue
                failed = t - passed[(op, label)]
                text = f"{passed[(op, label)]}/{t} passed" + (f", {failed} FAILED" if failed else "")
                cells.append(f"{text:>{cell}}")
            lines.append(f"{op:<{width}}" + "".join(cells))
        return "\n".join(lines)

    def details(self, limit: int = 10) -> str:
        """The first ``limit`` failures: case id, what was checked, and every problem."""
        lines = []
        for r in self.failures[:limit]:
            lines.append(f"FAILED [{r.label}] {r.case.id}")
            lines.extend(f"    {p}" for p in r.problems)
        hidden = len(self.failures) - limit
        if hidden > 0:
            lines.append(f"... and {hidden} more failures")
        return "\n".join(lines)

    def diagnosis(self, groups: int = 5) -> str:
        """The failures grouped by kind of problem, each group with the argument values all of
        its cases share and that set them apart from the passing cases: the likely cause."""
        failures = self.failures
        if not failures:
            return "diagnosis: every case passed"
        by_kind: dict[str, list[CaseResult]] = {}
        for r in failures:
            by_kind.setdefault(problem_kind(r.problems[0]), []).append(r)
        lines = [f"diagnosis of {len(failures)} failures:"]
        ranked = sorted(by_kind.items(), key=lambda kv: -len(kv[1]))
        for kind, group in ranked[:groups]:
            lines.append(f"  {_group_line(kind, group, self.results)}")
        rest = sum(len(g) for _, g in ranked[groups:])
        if rest:
            lines.append(f"  ... and {rest} failures of {len(ranked) - groups} other kinds")
        return "\n".join(lines)

    def summary(self) -> str:
        n, f = len(self.results), len(self.failures)
        return f"{n} cases, {n - f} passed, {f} failed"


def problem_kind(problem: str) -> str:
    """What went wrong, without the numbers: "value", "grad 0", "error: IndexError vs torch none
    raised", "warnings", "mutated one of its inputs"."""
    if problem.startswith(("error:", "backward error:")):
        head, _, rest = problem.partition(": ")
        ours, _, theirs = rest.partition(" vs torch ")
        return f"{head}: {_exception_type(ours)} vs torch {_exception_type(theirs)}"
    return problem.split(":")[0]


def _exception_type(text: str) -> str:
    match = re.match(r"\w+", text)
    return text if text.startswith(("none", "None")) or not match else match.group(0)


def features(case: Case, label: str) -> set[str]:
    """The argument values a case can share with others, as readable conditions."""
    found = {f"checked={label}"}
    for f in fields(case):
        value = getattr(case, f.name)
        if f.name == "dtype":
            found.add(f"dtype={str(value).removeprefix('torch.')}")
        elif f.name == "extra":
            found.update(f"{k}={v}" for k, v in value)
        elif f.name == "shape":
            found.add(f"{len(value)}-d input")
        elif value is not None and (f.name != "special" or value):  # None: not passed, torch's default
            found.add(f"{f.name}={value}")
    if case.label_smoothing:
        found.add("label_smoothing > 0")
    if case.weight != "none":
        found.add("a weight")
    if case.ignore_index is not None:
        found.add("ignore_index given")
    return found


def _group_line(kind: str, group: list[CaseResult], everything: list[CaseResult]) -> str:
    """One line: the group's size and kind, what all of its cases share that the passing cases
    mostly lack, and the conditions under which every case fails."""
    shared = set.intersection(*(features(r.case, r.label) for r in group))
    counts: Counter[str] = Counter()
    failing: Counter[str] = Counter()
    for r in everything:
        for feature in features(r.case, r.label) & shared:
            counts[feature] += 1
            failing[feature] += not r.passed
    # A condition that every checked case meets explains nothing.
    telling = [f for f in shared if counts[f] < len(everything)]
    telling.sort(key=lambda f: (-failing[f] / counts[f], counts[f], f))
    head = f"{len(group)} failures of kind '{kind}'"
    if not telling:
        return f"{head}: no argument value sets them apart"
    always = [f for f in telling if failing[f] == counts[f]]
    parts = [f"all have {', '.join(telling[:3])}"]
    if always:
        parts.append(f"every case with {always[0]} fails ({counts[always[0]]} cases)")
    else:
        best = telling[0]
        parts.append(f"{failing[best]} of the {counts[best]} cases with {best} fail")
    return f"{head}: {'; '.join(parts)}"
