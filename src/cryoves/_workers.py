"""Helper processes for the per-vesicle work of the refinement and outlier stages.

The per-vesicle fits and scores spend about half their time in Python-level array code that
holds the interpreter lock, so threads (:func:`cryoves._parallel.thread_map`) do not use a
second core fully: on 2 cores two threads refined 502 vesicles in 1.73-2.04 s against 2.29-2.38 s
in one, two processes in 1.22-1.28 s (docs/speed.md). Here ``n_cores() - 1`` helper processes
(each with its own interpreter) take chunks of the vesicles while this process computes chunks
too.

A helper is a fresh interpreter (``python -c``, no ``fork``: this process may run TensorFlow's or
Qt's threads, and no ``multiprocessing`` start method: those import the caller's main script
again). It reads the tomogram from its file (a memory-mapped array; any other array is worked on
threads here) and runs module-level functions ``func(tomogram, item, *common)`` sent by name,
with picklable items; the results come back in the items' order, equal to those of a plain loop.
A helper that dies is dropped (and replaced at the next use) and its chunk computed here; an
error in a helper is raised here. A helper reads exactly the file this process maps (checked in
``/proc/self/maps``: Linux; elsewhere the work stays on threads), or leaves its chunks here.
Helpers start on first use, or early with :func:`start_for` (as :func:`cryoves.pipeline.segment`
does when the global threshold begins), and end with this process or after
:data:`IDLE_SECONDS` without work. ``CRYOVES_HELPERS=0`` (or :func:`set_enabled`) turns them off.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from cryoves import _parallel
from cryoves._parallel import n_cores, thread_map

#: Fewer items than this are computed on threads (the helpers' round trips cost more).
MIN_ITEMS = 64
#: Items per chunk sent to a helper (a few tens of milliseconds of work); fewer when there are few.
CHUNK = 8
#: At most this many helpers.
MAX_HELPERS = 7
#: Modules a helper imports as it starts (those whose functions it runs), before its first task.
PRELOAD = ("cryoves.outliers",)
#: A helper idle this long (seconds) ends (its memory back to the system); the next use starts another.
IDLE_SECONDS = 300.0

_lock = threading.Lock()
_helpers: Optional[list] = None
_enabled = True
_registered = False


def set_enabled(flag: bool) -> None:
    """Allow or forbid helper processes in this process (e.g. off in a dask worker: one per core)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """Helpers allowed here: not turned off, two cores or more, and a Python to start them with
    (not a frozen application, whose executable is the application itself)."""
    return (_enabled and os.environ.get("CRYOVES_HELPERS", "1") != "0" and n_cores() >= 2
            and not getattr(sys, "frozen", False) and bool(sys.executable))


class HelperDied(RuntimeError):
    """A helper process ended before answering."""


class StaleVolume(RuntimeError):
    """A helper could not map the file this process maps (it changed on disk): the work is done here."""


class NotForHelpers(RuntimeError):
    """A task that cannot be sent to a helper (not picklable): the work is done here."""


class _Helper:
    def __init__(self):
        from multiprocessing.connection import Connection

        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)  # the helper imports this very cryoves
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from cryoves._workers import _serve; "
                 "_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:])",
                 str(task_r), str(res_w), repr(float(IDLE_SECONDS)), *PRELOAD],
                pass_fds=(task_r, res_w), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (task_w, res_r):
                os.close(fd)
            raise
        finally:
            os.close(task_r)
            os.close(res_w)
        self.send = Connection(task_w, readable=False)
        self.recv = Connection(res_r, writable=False)
        self.source = None
        self.busy = threading.Lock()

    def run(self, source: tuple, func: Callable, items: list, common: tuple) -> list:
        try:
            if source is not None and source != self.source:
                self.send.send(("volume", source))
                self.source = source
            try:
                self.send.send(("map", func.__module__, func.__qualname__, items, common))
            except (pickle.PicklingError, TypeError, AttributeError) as err:  # raised before anything is sent
                raise NotForHelpers(f"the task cannot be sent to a helper: {err}") from err
            msg = self.recv.recv()
        except (EOFError, OSError) as err:
            raise HelperDied(f"helper process {self.proc.pid} ended: {err!r}") from err
        if msg[0] == "ok":
            return msg[1]
        if msg[0] == "stale":
            self.source = None  # sent again next time
            raise StaleVolume(f"helper process {self.proc.pid} could not map {source[0]} as this process does")
        _, err, text = msg
        if isinstance(err, BaseException):
            err.add_note(f"in helper process {self.proc.pid}:\n{text}")
            raise err
        raise RuntimeError(f"in helper process {self.proc.pid}: {text}")

    def close(self) -> None:
        for conn in (self.send, self.recv):
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)  # its pipe closed: it exits
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve(task_fd: int, result_fd: int, idle_seconds: float = IDLE_SECONDS, preload=()) -> None:
    """A helper's loop: a volume to map, then chunks of items to compute, until the pipe closes."""
    import signal
    import traceback
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C: the parent stops, closing the pipe
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # reported with the first task that needs it
            pass
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    volume = None
    while True:
        try:
            if not tasks.poll(idle_seconds):
                os._exit(0)  # idle: the parent starts another when it needs one
            msg = tasks.recv()
        except (EOFError, OSError):
            os._exit(0)
        if msg[0] == "volume":
            path, dtype, offset, shape, identity = msg[1]
            volume = None
            try:
                with open(path, "rb") as fh:  # the file the parent maps, or none
                    st = os.fstat(fh.fileno())
                    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == tuple(identity):
                        volume = np.memmap(fh, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
            except OSError:
                pass
            continue
        _, module, qualname, items, common = msg
        if volume is None:
            results.send(("stale",))  # computed by the parent instead
            continue
        try:
            func = getattr(importlib.import_module(module), qualname)
            out = ("ok", [func(volume, it, *common) for it in items])
        except BaseException as err:  # noqa: BLE001 - raised again in the parent
            out = ("error", err, traceback.format_exc())
        try:
            results.send(out)
        except (OSError, ValueError):
            os._exit(0)
        except Exception:  # an unpicklable result or error: say what it was
            results.send(("error", None, traceback.format_exc()))


def start() -> list:
    """The helper processes (``n_cores() - 1``, at most :data:`MAX_HELPERS`), started now where
    missing (first use, or ended: idle, killed); empty when disabled or on one core."""
    global _helpers, _registered
    with _lock:
        if _helpers is None:
            _helpers = []
        for h in [h for h in _helpers if h.proc.poll() is not None]:  # ended
            _helpers.remove(h)
            h.close()
        if enabled():
            try:
                while len(_helpers) < min(n_cores() - 1, MAX_HELPERS):
                    _helpers.append(_Helper())
            except (OSError, ValueError):  # no processes to be had here: threads do the work
                pass
            if not _registered:
                atexit.register(shutdown)
                _registered = True
        return list(_helpers)


def start_for(tomogram) -> list:
    """Start the helpers now if they will work on ``tomogram`` (file-backed, helpers enabled);
    returns them (empty otherwise). :func:`cryoves.pipeline.segment` calls it as the global
    threshold begins: the helpers' imports (~0.5 s of CPU each) then use the cores the
    threshold stages leave idle, and they are ready for the refinement."""
    if not enabled() or volume_source(tomogram) is None:
        return []
    return start()


def shutdown() -> None:
    """End the helper processes (they also end with this process)."""
    global _helpers
    with _lock:
        hs, _helpers = _helpers or [], None
    for h in hs:
        h.close()


def _drop(helper) -> None:
    with _lock:
        if _helpers is not None and helper in _helpers:
            _helpers.remove(helper)
    helper.close()


def _mapped_file(address: int) -> Optional[tuple]:
    """``(device, inode)`` of the file mapped at ``address`` in this process (``/proc/self/maps``;
    None where there is no such table or no file there)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(None, 5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    return os.makedev(major, minor), int(fields[4])
    except (OSError, ValueError, IndexError):
        return None
    return None


def volume_source(tomogram) -> Optional[tuple]:
    """``(file, dtype, offset, shape, identity)`` a helper maps to read ``tomogram``, or None.

    None when ``tomogram`` is not a C-contiguous memory-mapped array, or when its file is no
    longer the one at its path (replaced since it was mapped; or where this cannot be checked: no
    ``/proc/self/maps``, or a file system that reports other numbers there, as overlay file
    systems do): a helper would read other data. ``identity`` is the file's (device, inode, size,
    modification time): a helper maps the file again when it changes, and checks it.
    """
    from cryoves.io import memmap_source

    src = memmap_source(tomogram)
    if src is None:
        return None
    try:
        st = os.stat(src[0])
    except OSError:
        return None
    if _mapped_file(tomogram.ctypes.data) != (st.st_dev, st.st_ino):
        return None
    return src + ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),)


def vesicle_map(func: Callable, tomogram, items: Iterable, common: tuple = (), *,
                min_items: int = MIN_ITEMS) -> Iterator:
    """``func(tomogram, item, *common)`` for every item, yielded in the items' order.

    On the helper processes and this one when there are helpers, at least ``min_items`` items
    and a file-backed (memory-mapped) ``tomogram``; on threads otherwise
    (:func:`cryoves._parallel.thread_map`, from ``min(min_items, its MIN_ITEMS)`` items).
    ``func`` must be a module-level function and items, ``common`` and results picklable (else
    the work stays here). When the consumer stops early (a progress callback raised
    to cancel), no new chunk is started and the running ones are awaited.
    """
    items = list(items)
    by_name = "<" not in func.__qualname__  # a helper finds it by name (no lambda, no local function)
    helpers = start() if (len(items) >= min_items and by_name and enabled()) else []
    source = volume_source(tomogram) if helpers else None
    if not helpers or source is None:
        yield from thread_map(lambda it: func(tomogram, it, *common), items,
                              min_items=min(min_items, _parallel.MIN_ITEMS))
        return
    # chunks of CHUNK items, smaller for a few items: two chunks per process at least
    size = max(1, min(CHUNK, -(-len(items) // (2 * (len(helpers) + 1)))))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    results: list = [None] * len(chunks)
    errors: dict = {}
    ready = [threading.Event() for _ in chunks]
    taken = iter(range(len(chunks)))
    take_lock = threading.Lock()
    stop = threading.Event()

    def local(chunk):
        return [func(tomogram, it, *common) for it in chunk]

    def work(helper):
        while not stop.is_set():
            with take_lock:
                j = next(taken, None)
            if j is None:
                return
            try:
                try:
                    if helper is None:
                        results[j] = local(chunks[j])
                    else:
                        with helper.busy:
                            results[j] = helper.run(source, func, chunks[j], common)
                except HelperDied:
                    _drop(helper)
                    helper = None  # this thread goes on computing here
                    results[j] = local(chunks[j])
                except (StaleVolume, NotForHelpers):
                    helper = None
                    results[j] = local(chunks[j])
            except BaseException as err:  # noqa: BLE001 - raised in the consumer's thread
                errors[j] = err
                stop.set()
            finally:
                ready[j].set()

    threads = [threading.Thread(target=work, args=(h,), name="cryoves-helper", daemon=True)
               for h in helpers + [None]]
    for t in threads:
        t.start()
    try:
        for j in range(len(chunks)):
            while not ready[j].wait(0.1):
                if not any(t.is_alive() for t in threads) and not ready[j].is_set():
                    break  # stopped by an error in a later chunk
            if errors:
                raise errors[min(errors)]
            yield from results[j]
    finally:
        stop.set()
        for t in threads:
            t.join()

