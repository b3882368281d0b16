"""Progress reporting and cancellation shared by every long-running core function.

Every long core function takes ``progress=None``: a callable ``progress(stage, done, total)``.
The caller (CLI progress bar, napari worker) may raise :class:`Cancelled` from inside that
callback to stop the work cleanly; core functions never catch it.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressCallback = Optional[Callable[[str, int, int], None]]


class Cancelled(Exception):
    """Raised (usually from a progress callback) to stop a long computation."""


def report(progress: ProgressCallback, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if given. Exceptions from it (e.g. :class:`Cancelled`) propagate."""
    if progress is not None:
        progress(stage, int(done), int(total))
