"""Run long core functions in a worker thread with progress, cancel and clean error messages.

The core reports progress through a callback ``progress(stage, done, total)`` and stops when
that callback raises :class:`cryoves.Cancelled`. :class:`TaskRunner` passes such a callback to
the function it runs in a napari worker thread; the callback

* raises ``Cancelled`` once the user pressed *Cancel* (in the widget or on napari's own
  progress bar in the activity dock / status bar), and
* forwards the progress to the GUI thread through a Qt signal (queued connection), where
  the widget's progress bar and a napari ``cancelable_progress`` bar are updated.

The function never touches Qt or layers; its result is handed to an ``on_done`` callback in
the GUI thread, which adds or updates the layers. Every exception is caught: a cancellation
shows an info notification, an error a napari error notification with a one-line message
(the traceback goes to the log, never into the user's face).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal

from cryoves._progress import Cancelled

__all__ = ["TaskRunner", "describe_error"]

log = logging.getLogger("cryoves.napari")

#: Stage keys of the core -> words for the progress bar.
STAGE_WORDS = {
    "predict": "Predicting vesicle probability",
    "tiles": "Predicting vesicle probability",
    "global": "Global threshold",
    "global_threshold": "Global threshold",
    "adaptive": "Adaptive threshold",
    "adaptive_threshold": "Adaptive threshold",
    "refine": "Fitting spheres",
    "outliers": "Outlier refinement",
    "render": "Rendering labels",
}


def describe_error(exc: BaseException) -> str:
    """A one-line, user-facing description of an exception (no traceback)."""
    msg = str(exc).strip() or type(exc).__name__
    first = msg.splitlines()[0]
    if isinstance(exc, MemoryError):
        return "not enough memory (try a smaller tile size or a cropped tomogram)"
    if isinstance(exc, KeyError):
        return f"missing {first}"
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, ImportError, OSError)):
        return first
    return f"{type(exc).__name__}: {first}"


class _Relay(QObject):
    progressed = Signal(str, int, int)


class TaskRunner:
    """Runs one task at a time for a dock widget.

    Parameters
    ----------
    run_buttons : list of magicgui PushButton
        Disabled while a task runs.
    cancel_button : magicgui PushButton
        Enabled while a task runs; pressing it cancels.
    progress_bar : magicgui ProgressBar
        Shown while a task runs.
    status : magicgui Label
        One line of status text (last result, or "cancelled").
    """

    def __init__(self, run_buttons, cancel_button, progress_bar, status):
        self._run_buttons = list(run_buttons)
        self._cancel_button = cancel_button
        self._bar = progress_bar
        self._status = status
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._cancel = threading.Event()
        self.worker = None
        self._pbar = None
        self._stage = None
        self._t0 = 0.0
        self._discard = False  # set by shutdown(): the result of the running task is dropped
        self.last_outcome: str | None = None  # "ok", "cancelled", "error", "discarded"
        self.last_error: str | None = None
        cancel_button.changed.connect(self.cancel)

    # -- state ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a task is running."""
        return self.worker is not None

    def cancel(self, *_):
        """Ask the running task to stop at its next progress report."""
        if self.busy:
            self._cancel.set()
            self._status.value = "Cancelling…"

    def shutdown(self) -> None:
        """The widget is going away: cancel the running task and drop its result.

        Whatever the task returns later never reaches ``on_done`` (so a closed dock widget
        cannot overwrite layers), and no new task can start.
        """
        self._discard = True
        self._cancel.set()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    # -- running ----------------------------------------------------------------------
    def start(self, func: Callable[[Callable], Any], on_done: Callable[[Any], str | None], desc: str,
              *, quiet: bool = False) -> bool:
        """Run ``func(progress)`` in a worker thread, then ``on_done(result)`` in the GUI thread.

        Parameters
        ----------
        func : callable
            Does the work; receives the progress callback to pass to the core.
        on_done : callable
            Receives the result in the GUI thread; may return a status line.
        desc : str
            What the task does (progress bar title, messages).
        quiet : bool
            No napari progress bar (for fast live previews).

        Returns
        -------
        bool
            False if another task is still running (nothing started).
        """
        if self.busy or self._discard:
            return False
        from napari.qt.threading import create_worker

        self._cancel.clear()
        self._desc = desc
        self._on_done = on_done
        self._stage = None
        self._t0 = time.perf_counter()
        for b in self._run_buttons:
            b.enabled = False
        self._cancel_button.enabled = True
        self._bar.min, self._bar.max, self._bar.value = 0, 0, 0
        self._bar.visible = True
        self._status.value = f"{desc}…"
        if not quiet:
            from napari.utils import cancelable_progress

            self._pbar = cancelable_progress(total=0, desc=desc, cancel_callback=self.cancel)
        worker = create_worker(self._call, func, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        self.worker = worker
        worker.start()
        return True

    def _callback(self, stage: str, done: int, total: int) -> None:
        # worker thread: never touch Qt widgets here
        pbar = self._pbar  # napari's progress bar: its cancel button only sets is_canceled
        if (self._cancel.is_set() or (self.worker is not None and self.worker.abort_requested)
                or (pbar is not None and getattr(pbar, "is_canceled", False))):
            raise Cancelled(f"{self._desc} cancelled")
        self._relay.progressed.emit(str(stage), int(done), int(total))

    def _call(self, func):
        try:
            return ("ok", func(self._callback))
        except Cancelled:
            return ("cancelled", None)
        except BaseException as exc:  # noqa: BLE001 - everything becomes a clear message
            log.exception("cryoves: %s failed", self._desc)
            return ("error", exc)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if self.worker is None or self._discard:  # a late report after the task ended
            return
        words = STAGE_WORDS.get(stage, stage.replace("_", " ").capitalize())
        self._bar.max = max(total, 0)
        self._bar.value = min(done, total) if total > 0 else 0
        self._status.value = f"{words}: {done}/{total}" if total > 0 else f"{words}…"
        pbar = self._pbar  # local: updating it may process events that end the task
        if pbar is not None:
            if stage != self._stage:
                pbar.set_description(words)
            if pbar.total != total:
                pbar.total = total
            pbar.n = done
            pbar.events.value(value=done)
        self._stage = stage

    def _finish_ui(self):
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        for b in self._run_buttons:
            b.enabled = True
        self._cancel_button.enabled = False
        self._bar.visible = False
        self.worker = None

    def _on_returned(self, outcome) -> None:
        from napari.utils.notifications import show_error, show_info

        kind, value = outcome
        if self._discard:  # the widget was closed meanwhile: touch nothing
            self.worker = None
            self.last_outcome = "discarded"
            log.info("cryoves: %s ended after its widget was closed (%s); result dropped", self._desc, kind)
            return
        elapsed = time.perf_counter() - self._t0
        self._finish_ui()
        self.last_outcome = kind
        self.last_error = None
        if kind == "cancelled":
            self._status.value = f"{self._desc}: cancelled"
            show_info(f"cryoves: {self._desc} cancelled")
            return
        if kind == "error":
            msg = describe_error(value)
            self.last_error = msg
            self._status.value = f"{self._desc} failed: {msg}"
            show_error(f"cryoves: {self._desc} failed: {msg}")
            return
        try:
            line = self._on_done(value)
        except Exception as exc:  # noqa: BLE001
            log.exception("cryoves: showing the result of %s failed", self._desc)
            msg = describe_error(exc)
            self.last_outcome, self.last_error = "error", msg
            self._status.value = f"{self._desc} failed: {msg}"
            show_error(f"cryoves: {self._desc} failed: {msg}")
            return
        self._status.value = (line or f"{self._desc}: done") + f"  ({elapsed:.1f} s)"
