"""Progress reports on stderr for the samplers, the ODE solvers and training: one class, :class:`Progress`.

* On a terminal, and in a Jupyter kernel: tqdm's bar (elapsed time, rate, ETA).
* Anywhere else (stderr redirected to a log file or a pipe, a CI job): whole lines, no ``\\r`` -- tqdm would
  redraw its bar with carriage returns, which a log keeps as one unreadable line: one each time another
  tenth of the work is done (at most one a second) or 10 s have passed since the last one, and one at the
  end, each with the elapsed time and an ETA.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``'1:15'``, ``3700`` -> ``'1:01:40'``; under a minute ``'4.2s'``."""
    if seconds != seconds or seconds == float("inf"):  # NaN or inf: not known yet
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


class Progress:
    """Progress over ``total`` units of work, starting at ``initial`` (a resumed run), reported on
    ``stream`` (default: ``sys.stderr`` when created). ``enabled=False`` reports nothing.

    ``update(n, postfix)`` advances by ``n`` (``postfix``: a short text shown after the counts, e.g. the
    loss); ``write(text)`` prints a line without breaking the bar; ``close()`` ends it. ``every_fraction``
    and ``every_seconds`` set how often a line is printed when ``stream`` is not a terminal; ``clock`` is
    the time source (seconds); ``rate=False`` leaves out the rate (units per second), e.g. for fractions of
    an interval."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        unit: str = "step",
        enabled: bool = True,
        stream=None,
        leave: bool = True,
        rate: bool = True,
        every_fraction: float = 0.1,
        every_seconds: float = 10.0,
        clock=time.monotonic,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.initial = int(initial)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.clock, self.leave, self.show_rate = clock, leave, rate
        self.start = self.last_time = clock()
        self.last_n = self.initial
        self.postfix = ""
        self.closed = False
        self.tqdm = None
        self.mode = None  # "tqdm" or "lines"
        if not enabled:
            return
        if _is_terminal(self.stream) or _in_notebook():
            from tqdm.auto import tqdm

            self.tqdm = tqdm(
                total=self.total, initial=self.initial, desc=desc, unit=unit, leave=leave, file=self.stream,
                dynamic_ncols=True,
            )  # fmt: skip
            self.mode = "tqdm"
        else:
            self.mode = "lines"

    # ---- what a line says ----

    def _status(self) -> str:
        done = self.n - self.initial
        elapsed = self.clock() - self.start
        pct = 100.0 * self.n / self.total if self.total else 100.0
        text = f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%)"
        if done > 0 and elapsed > 0:
            per = elapsed / done
            left = per * max(0, self.total - self.n)
            text += f", {format_seconds(elapsed)} elapsed, ETA {format_seconds(left)}"
            if self.show_rate:
                text += f" ({per:.3g} s/{self.unit})" if per >= 1 else f" ({1 / per:.3g} {self.unit}/s)"
        if self.postfix:
            text += f"  {self.postfix}"
        return text

    def _line(self) -> None:
        self.stream.write(self._status() + "\n")
        self.stream.flush()
        self.last_time, self.last_n = self.clock(), self.n

    # ---- the interface ----

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if postfix is not None:
            self.postfix = postfix
        if self.mode is None or self.closed:
            self.n += n
            return
        if self.mode == "tqdm":
            if postfix is not None:
                self.tqdm.set_postfix_str(postfix, refresh=False)
            self.tqdm.update(n)
            self.n = self.tqdm.n
            return
        self.n += n
        now = self.clock()
        if self.n == self.last_n:
            return
        step = max(1.0, self.every_fraction * self.total)
        crossed = int((self.n - self.initial) // step) > int((self.last_n - self.initial) // step)
        since = now - self.last_time
        if self.n >= self.total or since >= self.every_seconds or (crossed and since >= 1):
            self._line()

    def write(self, text: str) -> None:
        """A line of text on the stream (above the bar on a terminal)."""
        if self.mode is None:
            return
        if self.mode == "tqdm":
            self.tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mode == "tqdm":
            self.tqdm.close()
        elif self.mode == "lines" and self.n != self.last_n:
            self._line()
