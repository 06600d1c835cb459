"""The results: the derived figures (ratios, bandwidth), the table, the JSON and the plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    return (f"copy: {results.copy_gbps:.1f} GB/s (y.copy_(x) on {results.copy_bytes / 2**20:.0f} MiB, "
            f"bytes read plus written; median {results.copy_ms:.2f} ms)")


def table(results: Results) -> str:
    rows = results.rows()
    providers = [p for p in COLUMNS if any(p in r["ms"] for r in rows)]
    mem_providers = [p for p in MEMORY_ORDER if any(p == peak.provider for peak in results.peaks)]
    chunked = "torch-chunked" in providers  # linear_cross_entropy: torch's own chunked path
    header = ["workload", "dtype", "mode", *[f"{COLUMNS[p]} ms" for p in providers], "×eager", "×compile",
              *(["×chunked"] if chunked else []), "GB/s", "% copy"]
    if mem_providers:
        header.append("peak extra ×logits (" + " / ".join(COLUMNS[p] for p in mem_providers) + ")")
    lines = [header]
    for r in rows:
        cells = [r["name"], r["dtype"], r["mode"], *[_ms(r["ms"].get(p)) for p in providers],
                 _num(r["x_eager"], ".2f"), _num(r["x_compile"], ".2f"),
                 *([_num(r["x_chunked"], ".2f")] if chunked else []), _num(r["gbps"], ".1f"),
                 _num(r["pct_of_copy"], ".0f")]
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
    return out


LEGEND = (
    "×eager, ×compile, ×chunked (torch's chunked linear_cross_entropy): their median time over fusedce's\n"
    "(>1: fusedce faster). GB/s: fusedce's minimal bytes (linear_cross_entropy: those of its logits)\n"
    "(cross-entropy forward: logits read once; backward: read once + gradient written once; full: both;\n"
    "softmaxes: input read + output written, then output and upstream gradient read + gradient written)\n"
    "over its median time; % copy: that as a share of the copy's GB/s. Peak extra: the largest memory in\n"
    "use during one forward+backward beyond the inputs, gradient included, as a multiple of the logits."
)


def plot(results: Results, path: str) -> None:
    """Speed-up over torch eager per provider, one panel per mode. Needs matplotlib."""
    plt = require_matplotlib()
    rows = results.rows()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 3.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mode_rows = [r for r in rows if r["mode"] == mode]
        providers = [p for p in COLUMNS if any(r["ms"].get(p) for r in mode_rows)]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            heights = [speedup(r["ms"].get(provider), r["ms"].get("eager")) or float("nan") for r in mode_rows]
            ax.bar([j + i * width for j in range(len(mode_rows))], heights, width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mode_rows))])
        ax.set_xticklabels([f"{r['name']}\n{r['dtype']}" for r in mode_rows], fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")  # the speed-ups span orders of magnitude, from tiny to lm-128k
        ax.set_ylabel("speed-up over eager")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(f"fusedce on {results.env.get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fusedce[plot]'") from exc
    return plt
