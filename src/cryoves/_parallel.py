"""Per-vesicle work on the process's CPU cores.

The per-vesicle fits and scores of the refinement and outlier stages are independent of each
other and spend their time in FFTs and array code that release the GIL, so threads run them in
parallel. :func:`thread_map` returns the results in the order of the items, so a stage computes
exactly what a plain loop computes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def n_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Fewer items than this run in a plain loop (threads cost more than they save).
MIN_ITEMS = 16


def thread_map(func: Callable, items: Iterable, *, min_items: int | None = None, max_workers: int = 8) -> Iterator:
    """``func(item)`` for every item, yielded in the items' order, on up to ``n_cores()`` threads.

    Fewer than ``min_items`` (default :data:`MIN_ITEMS`) items, or one core: a plain loop in the
    calling thread. When the consumer stops early (e.g. a progress callback raised to cancel),
    the calls not yet started are cancelled.
    """
    items = list(items)
    min_items = MIN_ITEMS if min_items is None else min_items
    workers = min(n_cores(), max_workers)
    if workers < 2 or len(items) < min_items:
        for it in items:
            yield func(it)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cryoves")
    try:
        futures = [pool.submit(func, it) for it in items]
        for f in futures:
            yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
