"""Progress reporting and cancellation shared by every long-running core function.

Every long core function takes ``progress=None``: a callable ``progress(stage, done, total)``.
The caller (CLI progress bar, napari worker) may raise :class:`Cancelled` from inside that
callback to stop the work cleanly; core functions never catch it.

:class:`ConsoleProgress` is the command line's callback: progress bars on a terminal, plain
progress lines (one per stage step of 10 %, at most one per ``interval`` seconds) when the
output is a file or a pipe, so a log shows how far a long run got.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

__all__ = ["Cancelled", "ProgressCallback", "report", "ConsoleProgress"]

ProgressCallback = Optional[Callable[[str, int, int], None]]


class Cancelled(Exception):
    """Raised (usually from a progress callback) to stop a long computation."""


def report(progress: ProgressCallback, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if given. Exceptions from it (e.g. :class:`Cancelled`) propagate."""
    if progress is not None:
        progress(stage, int(done), int(total))


class ConsoleProgress:
    """A ``progress(stage, done, total)`` callback that shows progress on a console.

    Parameters
    ----------
    stream : file, optional
        Where to write (default ``sys.stderr``).
    bars : bool, optional
        tqdm progress bars; default: only if ``stream`` is a terminal. Otherwise one line per
        report that crosses a further 10 % of the stage (or ends it), at most one line per
        ``interval`` seconds except the last, e.g. ``train: 300/3000 (10%), 7.6 min``.
    interval : float
        Least seconds between two plain lines of a stage.
    labels : dict, optional
        Stage key -> words shown for it.

    Use it as a context manager (or call :meth:`close`) to end the bars.
    """

    def __init__(self, stream: TextIO | None = None, *, bars: bool | None = None, interval: float = 5.0,
                 labels: dict | None = None):
        self.stream = sys.stderr if stream is None else stream
        if bars is None:
            isatty = getattr(self.stream, "isatty", None)
            bars = bool(isatty and isatty())
        self.bars = bars
        self.interval = float(interval)
        self.labels = dict(labels or {})
        self._bars: dict = {}
        self._state: dict = {}  # stage -> (t0, last line time, last decile)

    def __call__(self, stage: str, done: int, total: int) -> None:
        words = self.labels.get(stage, stage)
        if self.bars:
            from tqdm import tqdm

            bar = self._bars.get(stage)
            if bar is None:
                bar = self._bars[stage] = tqdm(total=total or None, desc=words, file=self.stream)
            if total and bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()
            return
        now = time.monotonic()
        t0, last, decile = self._state.get(stage, (now, None, -1))
        d = int(10 * done / total) if total > 0 else 0
        end = total > 0 and done >= total
        if (last is None or d > decile or end) and (last is None or end or now - last >= self.interval):
            if end and decile == 10:
                return  # the end was already shown
            elapsed = now - t0
            when = f"{elapsed / 60:.1f} min" if elapsed >= 60 else f"{elapsed:.0f} s"
            frac = f" ({100 * done / total:.0f}%)" if total > 0 else ""
            of = f"/{total}" if total > 0 else ""
            self.stream.write(f"{words}: {done}{of}{frac}, {when}\n")
            self.stream.flush()
            self._state[stage] = (t0, now, 10 if end else d)
        else:
            self._state.setdefault(stage, (t0, last, decile))

    def close(self) -> None:
        """End the progress bars."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
