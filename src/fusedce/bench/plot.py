"""The ``--plot`` figure: speed-up over torch eager, one panel per mode, one group of bars per
workload. matplotlib is optional and imported only here, when a figure is asked for."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .report import COLUMNS, Results, require_matplotlib, speedup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# fusedce's variants share one colour family (blues), the other providers stand apart from it.
# eager is the 1× line every bar is measured against, not a bar.
COLOURS = {
    "fusedce": "#1f4e9c",
    "fusedce-inplace": "#6a9fd8",
    "compile": "#e08a1e",
    "liger": "#4c9a55",
}
LABELS = {"fusedce": "fusedce", "fusedce-inplace": "fusedce inplace_backward", "compile": "torch.compile",
          "liger": "Liger"}


def ratio_label(value: float) -> str:
    """2.6×, 18×, 0.71×: two significant figures, which is all the timing noise allows."""
    return f"{value:.2g}×" if value < 10 else f"{value:.0f}×"


def tick_label(value: float, _position: Any = None) -> str:
    """Ticks at powers of two: 1×, 2×, 4×, and ½× as 0.5×, never 2×10^0."""
    if value >= 1:
        return f"{value:.0f}×"
    return f"{value:.3g}×"


def _bars(results: Results) -> tuple[list[str], dict[str, list[dict[str, Any]]], list[str]]:
    """The modes, the rows of each, and the providers that have a ratio somewhere."""
    rows = results.rows()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in modes}
    providers = [p for p in COLOURS if any(_ratio(r, p) is not None for r in rows)]
    return modes, by_mode, providers


def _ratio(row: dict[str, Any], provider: str) -> float | None:
    return speedup(row["ms"].get(provider), row["ms"].get("eager"))


def figure(results: Results) -> Figure:
    """The figure itself (``plot`` saves it)."""
    plt = require_matplotlib()
    from matplotlib import ticker

    modes, by_mode, providers = _bars(results)
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.4 * len(modes)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mode_rows = by_mode[mode]
        ratios: list[float] = []
        for i, provider in enumerate(providers):
            heights = [_ratio(r, provider) for r in mode_rows]
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(mode_rows))]
            shown = [(x, h) for x, h in zip(xs, heights, strict=True) if h is not None and h > 0]
            if not shown:
                continue
            # Each bar grows from the 1× line: up when fusedce (or compile) beats eager, down when not.
            bars = ax.bar([x for x, _ in shown], [h - 1 for _, h in shown], width, bottom=1,
                          color=COLOURS[provider], label=LABELS.get(provider, COLUMNS.get(provider, provider)))
            ax.bar_label(bars, labels=[ratio_label(h) for _, h in shown], fontsize=7, padding=1)
            ratios += [h for _, h in shown]
        ax.axhline(1.0, color="black", linewidth=0.8, label="torch eager (1×)")
        ax.set_xticks(range(len(mode_rows)))
        ax.set_xticklabels([f"{r['name']}\n{r['dtype']}" for r in mode_rows], fontsize=8)
        # The ratios span orders of magnitude (tiny to lm-128k): a log axis, ticked at powers of two.
        ax.set_yscale("log", base=2)
        low, high = min([1.0, *ratios]), max([1.0, *ratios])
        ax.set_ylim(2 ** math.floor(math.log2(low) - 0.25), 2 ** math.ceil(math.log2(high) + 0.35))
        ax.yaxis.set_major_locator(ticker.LogLocator(base=2, numticks=12))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(tick_label))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel("speed-up over eager")
        ax.set_title(mode)
        ax.grid(axis="y", alpha=0.3)
    # One legend for every panel, above them, where it covers no bar.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"fusedce on {results.env.get('device', '?')}: speed-up over torch eager")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot(results: Results, path: str) -> None:
    plt = require_matplotlib()
    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
