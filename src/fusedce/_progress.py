"""Progress for ``python -m fusedce check`` and ``bench``: one live line on a terminal, plain lines
in a log.

On a terminal the line is redrawn in place with a carriage return (at most ten times a second)::

    reference@cpu [#########...............]  812/2203 cases  37%  0:41 elapsed  ETA 1:10  softmax-7x123-f32

Elsewhere (a CI log, a file) it prints ordinary lines, either every update or one per
``every_percent`` of the way. ``note`` prints a permanent line without breaking the live one.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration", "note"]

BAR_WIDTH = 24
REDRAW_S = 0.1

# The live line on each stream, so that a note can clear it and draw it again underneath.
_live: dict[int, Progress] = {}
_lock = threading.Lock()  # bench measures memory from a thread pool


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    whole = max(int(seconds + 0.5), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class Progress:
    """``done`` of ``total`` steps, with the elapsed time and an estimate of the time left.

    ``interactive`` defaults to whether ``stream`` (stderr) is a terminal. ``every_percent``:
    in plain mode, print a line only when the percentage crosses a multiple of it (None: every
    update). ``unit`` follows the counts ("cases").
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        interactive: bool | None = None,
        every_percent: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self.every_percent = every_percent
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.detail = ""
        self._last_draw = -float("inf")
        self._last_step = -1
        self._shown = False

    def update(self, done: int, total: int | None = None, detail: str = "") -> None:
        """Record progress; ``total`` may be given here instead of at construction."""
        with _lock:
            if total is not None:
                self.total = total
            self.done, self.detail = done, detail
            finished = self.total is not None and done >= self.total
            if self.interactive:
                now = self.clock()
                if finished or now - self._last_draw >= REDRAW_S:
                    self._last_draw = now
                    self._draw()
                if finished:
                    self._end_line()
            elif self._new_step():
                print(self.plain_line(), file=self.stream, flush=True)

    def close(self) -> None:
        """End the live line (when the run stops before ``total``)."""
        with _lock:
            if self.interactive:
                self._end_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The two renderings -------------------------------------------------------------------

    def _counts(self) -> tuple[str, int | None]:
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.done}{unit}", None
        return f"{self.done}/{self.total}{unit}", 100 * self.done // self.total

    def plain_line(self) -> str:
        counts, percent = self._counts()
        text = f"{self.label}: {counts}" + ("" if percent is None else f" ({percent}%)")
        if self.detail:
            text += f" {self.detail}"
        return text + f", {self.clock() - self.start:.0f} s"

    def live_line(self, width: int) -> str:
        counts, percent = self._counts()
        elapsed = self.clock() - self.start
        parts = [self.label]
        if percent is not None:
            filled = BAR_WIDTH * min(self.done, self.total or 0) // (self.total or 1)
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
        parts.append(counts)
        if percent is not None:
            parts.append(f"{percent:3d}%")
        parts.append(f"{format_duration(elapsed)} elapsed")
        left = (self.total or 0) - self.done
        if percent is not None and left > 0:
            # The average pace so far; nothing to go on before the first step.
            parts.append("ETA " + (format_duration(elapsed / self.done * left) if self.done else "-:--"))
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)[: max(width - 1, 10)]  # never wrap: a wrapped line cannot be redrawn

    # Terminal handling --------------------------------------------------------------------

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write("\r\033[K" + self.live_line(width))
        self.stream.flush()
        self._shown = True
        _live[id(self.stream)] = self

    def _end_line(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
        if _live.get(id(self.stream)) is self:
            del _live[id(self.stream)]

    def _new_step(self) -> bool:
        """Plain mode: whether this update starts a new line (always, or per every_percent)."""
        if self.every_percent is None or not self.total:
            return True
        step = 100 * self.done // self.total // self.every_percent
        if step == self._last_step:
            return False
        self._last_step = step
        return True


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def note(message: str, stream: TextIO | None = None) -> None:
    """A permanent line. A live progress line on the same stream is cleared first and drawn
    again below it, so the two never garble each other."""
    stream = stream if stream is not None else sys.stderr
    with _lock:
        live = _live.get(id(stream))
        if live is not None:
            stream.write("\r\033[K")
        print(message, file=stream, flush=True)
        if live is not None:
            live._draw()
