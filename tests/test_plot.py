"""The ``bench --plot`` figure: every bar labelled with its ratio, ticks at 1×, 2×, 4×, and one
colour family for fusedce's variants. Skipped without matplotlib (an optional extra)."""

from __future__ import annotations

import colorsys
import math

import pytest

from fusedce.__main__ import main
from fusedce.bench import report

matplotlib = pytest.importorskip("matplotlib")

from fusedce.bench import plot  # noqa: E402  (needs matplotlib)

# (workload, name, mode) -> ms per provider; eager is the baseline.
TIMES = {
    ("cross_entropy/lm-32k/fp32", "lm-32k", "forward"): {"fusedce": 10.0, "fusedce-inplace": 10.0, "eager": 52.0,
                                                          "compile": 25.0},
    ("cross_entropy/lm-32k/fp32", "lm-32k", "full"): {"fusedce": 20.0, "fusedce-inplace": 12.0, "eager": 218.0,
                                                       "compile": 110.0},
    ("cross_entropy/tiny/fp32", "tiny", "forward"): {"fusedce": 0.05, "fusedce-inplace": 0.05, "eager": 0.03,
                                                      "compile": 0.08},
    ("cross_entropy/tiny/fp32", "tiny", "full"): {"fusedce": 0.1, "fusedce-inplace": None, "eager": 0.07,
                                                   "compile": 0.2},
}


def _results() -> report.Results:
    results = report.Results({"device": "test cpu"}, copy_ms=1.0, copy_gbps=10.0, copy_bytes=1)
    for (key, name, mode), times in TIMES.items():
        for provider, ms in times.items():
            results.timings.append(report.Timing(key, name, "cross_entropy", "fp32", [4, 7], mode, provider, ms,
                                                 3, 112, None if ms else "failed"))
    return results


def _hue(colour) -> float:
    r, g, b = matplotlib.colors.to_rgb(colour)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


def test_every_bar_carries_its_ratio():
    fig = plot.figure(_results())
    forward, full = fig.axes
    assert (forward.get_title(), full.get_title()) == ("forward", "full")
    for ax, mode in ((forward, "forward"), (full, "full")):
        expected = sorted(
            plot.ratio_label(times["eager"] / ms)
            for (_, _, m), times in TIMES.items() if m == mode
            for provider, ms in times.items() if provider != "eager" and ms
        )
        labels = sorted(t.get_text() for t in ax.texts)
        assert labels == expected
    # The figures the bars are labelled with: 5.2×, 11×, 18×, 0.6×, 0.38×, ...
    assert {"5.2×", "11×", "18×", "0.6×", "0.38×"} <= {t.get_text() for ax in fig.axes for t in ax.texts}
    matplotlib.pyplot.close(fig)


def test_the_ticks_read_as_multiples():
    fig = plot.figure(_results())
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert "1×" in ticks and "2×" in ticks and "0.5×" in ticks
        for text in ticks:  # plain multiples at powers of two: no 2×10^0, no $...$ mathtext
            value = float(text.removesuffix("×"))
            assert text.endswith("×") and math.log2(value) == round(math.log2(value)), text
        assert not [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    assert [plot.tick_label(v) for v in (0.25, 0.5, 1, 2, 16, 1024)] == ["0.25×", "0.5×", "1×", "2×", "16×", "1024×"]
    matplotlib.pyplot.close(fig)


def test_fusedce_variants_share_one_colour_family():
    fig = plot.figure(_results())
    (figure_legend,) = fig.legends
    legend = {text.get_text(): handle for text, handle in
              zip(figure_legend.get_texts(), figure_legend.legend_handles, strict=True)}
    ours = [legend["fusedce"], legend["fusedce inplace_backward"]]
    theirs = legend["torch.compile"]
    hues = [_hue(h.get_facecolor()) for h in ours]
    assert all(200 <= h <= 230 for h in hues), hues  # blues
    assert abs(_hue(theirs.get_facecolor()) - hues[0]) > 90
    assert "torch eager (1×)" in legend  # the baseline is a line, not a bar of 1×
    matplotlib.pyplot.close(fig)


def test_the_command_writes_a_png(tmp_path, capsys):
    path = tmp_path / "speedups.png"
    code = main(["bench", "--workload", "cross_entropy/micro/fp32", "--mode", "forward", "--device", "cpu",
                 "--repeats", "2", "--no-memory", "--provider", "fusedce", "--provider", "eager",
                 "--plot", str(path)])
    assert code == 0, capsys.readouterr().err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
