"""The results: the derived figures (ratios, bandwidth), the table, the JSON and the plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .memory import Peak

# The providers shown in the table's time columns, and their headers.
COLUMNS = {"fusedce": "fusedce", "fusedce-inplace": "inplace", "eager": "eager", "compile": "compile",
           "torch-chunked": "chunked", "liger": "liger"}
MEMORY_ORDER = ("fusedce", "fusedce-inplace", "eager", "compile", "torch-chunked", "liger")


@dataclass
class Timing:
    workload: str  # Workload.key
    name: str
    op: str
    dtype: str
    shape: list[int]
    mode: str
    provider: str
    ms: float | None  # the median; None when the provider failed
    repeats: int
    bytes: int  # the mode's minimal bytes (workloads.minimal_bytes)
    error: str | None = None


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def speedup(ours_ms: float | None, theirs_ms: float | None) -> float | None:
    """theirs / ours: greater than 1 means fusedce is faster."""
    if ours_ms is None or theirs_ms is None or ours_ms <= 0:
        return None
    return theirs_ms / ours_ms


def percent_of_copy(nbytes: int, ms: float | None, copy_gbps: float) -> float | None:
    if ms is None or ms <= 0 or copy_gbps <= 0:
        return None
    return 100 * gbps(nbytes, ms) / copy_gbps


@dataclass
class Results:
    env: dict[str, Any]
    copy_ms: float
    copy_gbps: float
    copy_bytes: int
    timings: list[Timing] = field(default_factory=list)
    peaks: list[Peak] = field(default_factory=list)
    # The same timings in torch's default environment (CPU: THP_MEM_ALLOC_ENABLE unset), shown as
    # the second figure beside these, which come from torch's best environment.
    baseline: Results | None = None

    @classmethod
    def from_json(cls, found: dict[str, Any]) -> Results:
        peak_fields = {f.name for f in fields(Peak)}
        return cls(found["env"], found["copy"]["ms"], found["copy"]["gbps"], found["copy"]["bytes"],
                   [Timing(**t) for t in found["timings"]],
                   [Peak(**{k: v for k, v in p.items() if k in peak_fields}) for p in found["memory"]],
                   None if found.get("baseline") is None else cls.from_json(found["baseline"]))

    def _ratios(self) -> dict[tuple[str, str], tuple[float | None, float | None]]:
        """(×eager, ×compile) per (workload, mode)."""
        groups: dict[tuple[str, str], dict[str, float | None]] = {}
        for t in self.timings:
            groups.setdefault((t.workload, t.mode), {})[t.provider] = t.ms
        return {key: (speedup(ms.get("fusedce"), ms.get("eager")), speedup(ms.get("fusedce"), ms.get("compile")))
                for key, ms in groups.items()}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (workload, mode), in run order: the times, fusedce's ratios and bandwidth,
        and (on the workload's first row) the peak memory of every provider."""
        groups: dict[tuple[str, str], list[Timing]] = {}
        for t in self.timings:
            groups.setdefault((t.workload, t.mode), []).append(t)
        peaks: dict[str, dict[str, float | None]] = {}
        for p in self.peaks:
            peaks.setdefault(p.workload, {})[p.provider] = p.ratio
        shown: set[str] = set()
        baseline = self.baseline._ratios() if self.baseline is not None else {}
        rows = []
        for (key, mode), timings in groups.items():
            first = timings[0]
            ms = {t.provider: t.ms for t in timings}
            ours = ms.get("fusedce")
            copy_pct = percent_of_copy(first.bytes, ours, self.copy_gbps)
            row: dict[str, Any] = {
                "workload": key,
                "name": first.name if first.op == "cross_entropy" else f"{first.op} {first.name}",
                "dtype": first.dtype,
                "mode": mode,
                "ms": ms,
                "x_eager": speedup(ours, ms.get("eager")),
                "x_compile": speedup(ours, ms.get("compile")),
                "x_chunked": speedup(ours, ms.get("torch-chunked")),
                "bytes": first.bytes,
                "gbps": None if ours is None else gbps(first.bytes, ours),
                "pct_of_copy": copy_pct,
                "peak_x_logits": None,
                "x_eager_default": baseline.get((key, mode), (None, None))[0],
                "x_compile_default": baseline.get((key, mode), (None, None))[1],
            }
            if key in peaks and key not in shown:
                shown.add(key)
                row["peak_x_logits"] = peaks[key]
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "copy": {"ms": self.copy_ms, "gbps": self.copy_gbps, "bytes": self.copy_bytes},
            "timings": [asdict(t) for t in self.timings],
            "memory": [{**asdict(p), "ratio": p.ratio} for p in self.peaks],
            "rows": self.rows(),
            "baseline": None if self.baseline is None else self.baseline.to_json(),
        }

    def write_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def environment_lines(env: dict[str, str]) -> list[str]:
    return [f"{key}: {value}" for key, value in env.items()]


def copy_line(results: Results) -> str:
    line = (f"copy: {results.copy_gbps:.1f} GB/s (y.copy_(x) on {results.copy_bytes / 2**20:.0f} MiB, "
            f"bytes read plus written; median {results.copy_ms:.2f} ms)")
    if results.baseline is not None:
        line += f"; {results.baseline.copy_gbps:.1f} GB/s in the default environment's run"
    return line


def environment_note(results: Results) -> list[str]:
    """Which environment each figure's process ran in, and whether torch's tensors got huge pages."""
    lines = []
    for label, run in (("figures", results), ("default env", results.baseline)):
        if run is not None and "torch environment" in run.env:
            pages = run.env.get("torch huge pages (MiB)", "?")
            lines.append(f"{label}: {run.env['torch environment']} for every provider "
                         f"(huge pages under torch's tensors: {pages})")
    return lines


def table(results: Results) -> str:
    rows = results.rows()
    providers = [p for p in COLUMNS if any(p in r["ms"] for r in rows)]
    mem_providers = [p for p in MEMORY_ORDER if any(p == peak.provider for peak in results.peaks)]
    chunked = "torch-chunked" in providers  # linear_cross_entropy: torch's own chunked path
    header = ["workload", "dtype", "mode", *[f"{COLUMNS[p]} ms" for p in providers], "×eager", "×compile",
              *(["×chunked"] if chunked else []), "GB/s", "% copy"]
    with_default = results.baseline is not None
    if with_default:
        header += ["×eager default env", "×compile default env"]
    if mem_providers:
        header.append("peak extra ×logits (" + " / ".join(COLUMNS[p] for p in mem_providers) + ")")
    lines = [header]
    for r in rows:
        cells = [r["name"], r["dtype"], r["mode"], *[_ms(r["ms"].get(p)) for p in providers],
                 _num(r["x_eager"], ".2f"), _num(r["x_compile"], ".2f"),
                 *([_num(r["x_chunked"], ".2f")] if chunked else []), _num(r["gbps"], ".1f"),
                 _num(r["pct_of_copy"], ".0f")]
        if with_default:
            cells += [_num(r["x_eager_default"], ".2f"), _num(r["x_compile_default"], ".2f")]
        if mem_providers:
            peak = r["peak_x_logits"]
            cells.append("" if peak is None else " / ".join(_num(peak.get(p), ".2f") for p in mem_providers))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)


def notes(results: Results) -> list[str]:
    """Failures, and how to read the figures."""
    out = [f"{t.workload} {t.mode} {t.provider}: {t.error}" for t in results.timings if t.error]
    out += [f"memory {p.workload} {p.provider}: {p.error}" for p in results.peaks if p.error]
    if results.baseline is not None:
        out += [f"default env: {line}" for line in notes(results.baseline)]
    return out


LEGEND = (
    "×eager, ×compile, ×chunked (torch's chunked linear_cross_entropy): their median time over fusedce's\n"
    "(>1: fusedce faster). GB/s: fusedce's minimal bytes (linear_cross_entropy: those of its logits)\n"
    "(cross-entropy forward: logits read once; backward: read once + gradient written once; full: both;\n"
    "softmaxes: input read + output written, then output and upstream gradient read + gradient written)\n"
    "over its median time; % copy: that as a share of the copy's GB/s. Peak extra: the largest memory in\n"
    "use during one forward+backward beyond the inputs, gradient included, as a multiple of the logits."
)
ENVIRONMENT_LEGEND = (
    "Every provider, torch's and fusedce's, ran in one process per environment: the figures with\n"
    "THP_MEM_ALLOC_ENABLE=1 (torch's best: huge pages for its large tensors, fewer page faults), the\n"
    "'default env' columns with it unset. fusedce madvises its own large outputs into huge pages in both."
)


def legend(results: Results) -> str:
    return LEGEND + ("\n" + ENVIRONMENT_LEGEND if results.baseline is not None else "")


def plot(results: Results, path: str) -> None:
    """Speed-up over torch eager per provider, one panel per mode. Needs matplotlib."""
    from . import plot as figure  # matplotlib only when a figure is asked for

    figure.plot(results, path)


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fusedce[plot]'") from exc
    return plt
