"""Work on the process's CPU cores, on threads.

Whole-volume steps run slab by slab (:func:`slab_map`), independent per-segment and
per-vesicle work item by item (:func:`thread_map`); numpy's and scipy's array code releases the
interpreter lock for most of it. Results come back in the order of the items, so a stage computes
exactly what a plain loop computes. The per-vesicle fits and scores of the refinement and outlier
stages hold the lock about half their time: :mod:`cryoves._workers` runs them in helper processes
where it can, on these threads otherwise.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
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
    if len(items) < min_items:
        for it in items:
            yield func(it)
        return
    # every item submitted at once
    yield from thread_imap(func, items, window=max(1, len(items)), max_workers=max_workers)


def thread_imap(func: Callable, items: Iterable, *, window: int = 128, max_workers: int = 8) -> Iterator:
    """``func(item)`` for every item, yielded in the items' order, on up to ``n_cores()`` threads,
    taking the items lazily: at most ``window`` are in flight (submitted, or done and not yet
    yielded), so the items (and what they hold) need not exist all at once.

    Unlike batches of :func:`thread_map`, the threads keep working while the caller handles a
    result: the next item is submitted as each result is yielded. One core: a plain loop. When the
    consumer stops early, the calls not yet started are cancelled.
    """
    it = iter(items)
    workers = min(n_cores(), max_workers)
    if workers < 2:
        for item in it:
            yield func(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cryoves")
    try:
        pending = deque(pool.submit(func, item) for item in itertools.islice(it, max(1, int(window))))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(func, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def slab_step(n_planes: int, max_step: int) -> int:
    """Planes per slab for whole-volume work done slab by slab on threads (:func:`slab_map`).

    At most ``max_step`` planes (the memory bound of the caller's slabs), and few enough that
    every core gets a slab: a 160-plane volume whose slabs may hold 113 planes is cut into two
    of 80 on two cores (not 113 + 47); on one core the slabs are those of ``max_step``.
    """
    n_planes, max_step = int(n_planes), max(1, int(max_step))
    workers = min(n_cores(), 8)
    return max(1, min(max_step, -(-n_planes // max(1, workers))))


def slab_map(func: Callable, n_planes: int, max_step: int) -> list:
    """``[func(z0, z1) for each slab]`` of a volume of ``n_planes`` planes, on up to ``n_cores()`` threads.

    Slabs of :func:`slab_step` planes, in order; the results come back in that order, so a caller
    that combines them in order (sums, concatenation, writes to disjoint slabs) computes exactly
    what a plain loop computes. ``func`` must release the GIL for most of its work (numpy and
    scipy.ndimage do) and must not write outside its slab.
    """
    step = slab_step(n_planes, max_step)
    starts = list(range(0, int(n_planes), step))
    return list(thread_map(lambda z0: func(z0, min(int(n_planes), z0 + step)), starts, min_items=2))
