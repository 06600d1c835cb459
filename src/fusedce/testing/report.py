"""The parity report: per-case results, a summary table and the first failures in detail."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
        lines = [f"{'op':<{width}}" + "".join(f"{label:>22}" for label in labels)]
        for op in ops:
            cells = []
            for label in labels:
                t = total[(op, label)]
                if not t:
                    cells.append(f"{'-':>22}")
                    continue
                failed = t - passed[(op, label)]
                text = f"{passed[(op, label)]}/{t} passed" + (f", {failed} FAILED" if failed else "")
                cells.append(f"{text:>22}")
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

    def summary(self) -> str:
        n, f = len(self.results), len(self.failures)
        return f"{n} cases, {n - f} passed, {f} failed"
