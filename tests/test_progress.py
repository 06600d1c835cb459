"""The progress line of ``check`` and ``bench``: live on a terminal, plain lines in a log."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest

from fusedce import _progress
from fusedce._progress import Progress, format_duration, note


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """A terminal of 200 columns, whatever runs the tests."""
    monkeypatch.setattr(_progress.shutil, "get_terminal_size", lambda fallback=(100, 24): os.terminal_size((200, 24)))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_duration():
    assert [format_duration(s) for s in (0, 7.4, 59.6, 754, 3723)] == ["0:00", "0:07", "1:00", "12:34", "1:02:03"]


def test_a_log_gets_a_line_per_update_or_per_step_of_percent():
    every, tenths = io.StringIO(), io.StringIO()
    each, coarse = Progress("bench", 4, stream=every), Progress("check", 200, unit="cases", stream=tenths,
                                                                 every_percent=10)
    for i in range(5):
        each.update(i, detail=f"step {i}")
    for i in range(1, 201):
        coarse.update(i)
    assert every.getvalue().splitlines()[1].startswith("bench: 1/4 (25%) step 1, ")
    assert len(every.getvalue().splitlines()) == 5
    lines = tenths.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("check: 1/200 cases (0%), ")
    assert lines[-1].startswith("check: 200/200 cases (100%), ")
    assert "\r" not in every.getvalue() + tenths.getvalue()


def test_a_terminal_gets_one_line_redrawn_with_counts_elapsed_and_eta():
    stream, clock = Terminal(), Clock()
    bar = Progress("reference@cpu", 10, unit="cases", stream=stream, clock=clock)
    assert bar.interactive
    clock.now += 6.0
    bar.update(3, detail="softmax-7x123-f32")
    text = stream.getvalue()
    assert text.startswith("\r\033[K") and "\n" not in text
    assert "[#######.................]" in text and "3/10 cases" in text and "30%" in text
    assert "0:06 elapsed" in text and "ETA 0:14" in text and text.endswith("softmax-7x123-f32")

    clock.now += 0.05
    bar.update(4)  # within the redraw interval: nothing drawn
    assert stream.getvalue() == text
    clock.now += 0.05
    bar.update(10)  # the last one is always drawn, and ends the line
    final = stream.getvalue()[len(text):]
    assert final.startswith("\r\033[K") and final.endswith("\n") and "10/10 cases" in final and "ETA" not in final


def test_the_live_line_never_wraps():
    bar = Progress("x" * 30, 1000, unit="cases", stream=Terminal())
    bar.update(5, detail="a-long-case-id-" * 20)
    assert len(bar.live_line(60)) < 60 and len(bar.live_line(200)) < 200


def test_a_note_clears_the_live_line_and_draws_it_again():
    stream = Terminal()
    bar = Progress("bench", 5, stream=stream)
    bar.update(1, detail="lm-32k")
    before = stream.getvalue()
    note("  failed: RuntimeError", stream)
    after = stream.getvalue()[len(before):]
    assert after.startswith("\r\033[K  failed: RuntimeError\n\r\033[Kbench")
    bar.close()
    assert stream.getvalue().endswith("\n")
    note("done", stream)  # no live line any more: just the line
    assert stream.getvalue().endswith("\ndone\n")
    assert id(stream) not in _progress._live


def test_close_ends_an_unfinished_line_once():
    stream = Terminal()
    with Progress("check", 10, stream=stream) as bar:
        bar.update(2)
    with Progress("check", 10, stream=stream):
        pass  # nothing drawn, nothing to end
    assert stream.getvalue().count("\n") == 1


def _stderr_on_a_terminal(monkeypatch) -> Terminal:
    # In the test body: pytest's own capture replaces sys.stderr again when the test starts.
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_check_draws_a_live_line_on_a_terminal(monkeypatch):
    from fusedce.__main__ import main

    terminal = _stderr_on_a_terminal(monkeypatch)
    assert main(["check", "--op", "softmax", "--backend", "reference", "--quick"]) == 0
    live = [line for line in terminal.getvalue().split("\n") if "\r" in line]
    assert len(live) == 1 and "reference@cpu  [" in live[0] and "ETA" in live[0]
    assert live[0].rsplit("\r\033[K", 1)[1].startswith("reference@cpu  [########################]")


def test_check_prints_plain_lines_in_a_log(capsys):
    from fusedce.__main__ import main

    assert main(["check", "--op", "softmax", "--backend", "reference", "--quick"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^reference@cpu: (\d+)/\1 cases \(100%\), ", err, re.MULTILINE), err


def test_bench_draws_a_live_line_on_a_terminal(monkeypatch):
    from fusedce.__main__ import main

    terminal = _stderr_on_a_terminal(monkeypatch)
    assert main(["bench", "--workload", "cross_entropy/micro/fp32", "--mode", "forward", "--mode", "full",
                 "--device", "cpu", "--repeats", "2", "--no-memory", "--provider", "fusedce",
                 "--torch-env", "inherit"]) == 0  # in this process (the default times in child processes)
    text = terminal.getvalue()
    assert "\r\033[Kbench  [" in text and "cross_entropy/micro/fp32 forward fusedce" in text
    assert "2/2 steps  100%" in text
