"""Keep the memory a segmentation frees for its own later arrays (glibc only).

glibc's ``malloc`` serves every block above 32 MB (every volume-sized array: 105-210 MB for a
200x512x512 tomogram) with a fresh ``mmap`` and hands it back to the kernel when it is freed, so
the next volume-sized array starts on pages the process has never touched. Each such page costs a
page fault and, in a virtual machine, often the host's work of backing it: on this project's
2-core VM, first writes to 210 MB took 0.8 s (0.02 s when the pages were the process's already),
and ``cryoves segment`` on 200x512x512 spent 6.6-7.4 s of system time. Serving the large blocks
from the heap and not trimming it (``mallopt(M_MMAP_MAX, 0)``, ``M_TRIM_THRESHOLD`` 2 GB) lets
a stage reuse what the stage before it freed.

The price is that the process holds its peak memory while the setting lasts, so it is scoped:
:func:`kept_freed_memory` turns it on for one block and, after it, restores glibc's defaults and
returns the free memory to the system (``malloc_trim``). ``cryoves segment`` uses it for each
tomogram it predicts in its own process (below :data:`cryoves.pipeline.CHILD_PROCESS_VOXELS`);
a full-size tomogram keeps glibc's defaults (its memory bound, docs/speed.md).
``CRYOVES_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading

#: ``mallopt`` parameters (glibc's malloc.h) and glibc's defaults for them
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
#: while kept, the heap is trimmed only when this much lies free at its top (a C int)
TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_depth = 0  # nesting of kept_freed_memory blocks in effect


def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or None (another C library or system)."""
    if os.environ.get("CRYOVES_KEEP_FREED_MEMORY", "1").strip() == "0":
        return None
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - glibc has both
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return mallopt, trim


def keeping() -> bool:
    """Whether freed memory is being kept now (inside a :func:`kept_freed_memory` block that took effect)."""
    return _depth > 0


@contextlib.contextmanager
def kept_freed_memory(enabled: bool = True):
    """Keep the memory this process frees for its later allocations, for the duration of the block.

    Yields True when the setting is in effect. Nothing changes (yields False) when ``enabled`` is
    false, on other C libraries and systems, or with ``CRYOVES_KEEP_FREED_MEMORY=0``. After the
    outermost block glibc's defaults are restored and the free memory is returned to the system.
    The setting is process-wide (every thread's allocations); blocks may nest.
    """
    global _depth
    fns = _libc() if enabled else None
    on = False
    if fns is not None:
        mallopt, _ = fns
        with _lock:
            if _depth == 0:
                # the trim threshold first: a refused M_MMAP_MAX leaves only a higher threshold
                on = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
                if not on:
                    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            else:
                on = True
            if on:
                _depth += 1
    try:
        yield on
    finally:
        if on:
            mallopt, trim = fns
            with _lock:
                _depth -= 1
                if _depth == 0:
                    mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                    trim(0)


class Prefaulted:
    """An uninitialised array whose pages a background thread touches, at the lowest CPU priority.

    A volume the process will need soon (the global threshold's label volume, while the network
    predicts) is allocated now and its pages are written once, one byte each, by a thread niced to
    19: it runs when a core is idle (TensorFlow left about a fifth of the 2 cores idle while
    predicting, measured) instead of the stage that needs the volume paying for its fresh pages
    later (on 200x512x512, ~1.7 s of the global threshold's 3.5 s were the kernel zeroing the label
    volume's pages, ``perf``). :meth:`take` stops the thread (the pages not reached yet come on
    first use, as they would have) and hands the array over; :meth:`discard` drops it.

    The values are undefined (zeros where touched): for an output that is written whole.
    """

    #: bytes touched between two checks of the stop flag (each a numpy call without the GIL)
    CHUNK = 16 * 2**20
    _PAGE = 4096

    def __init__(self, shape, dtype):
        import numpy as np

        self._array = np.empty(shape, dtype)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._touch, name="cryoves-prefault", daemon=True)
        self._thread.start()

    def _touch(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):  # elsewhere: the whole process's priority is not changed
            return
        flat = self._array.reshape(-1).view("u1")  # take() clears _array only after this thread ends
        for i in range(0, flat.size, self.CHUNK):
            if self._stop.is_set():
                return
            flat[i:i + self.CHUNK:self._PAGE] = 0

    def take(self):
        """Stop touching and return the array (None after :meth:`take` or :meth:`discard`)."""
        self._stop.set()
        self._thread.join()
        arr, self._array = self._array, None
        return arr

    def discard(self) -> None:
        """Stop touching and drop the array."""
        self.take()
