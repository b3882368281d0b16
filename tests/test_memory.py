"""cryoves._memory: a segmentation keeps the memory it frees for its own later arrays (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from cryoves import _memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="glibc's mallopt only")

# frees a 200 MB array inside the block and prints whether the block took effect and the RSS (kB)
# after the free, inside the block and after it
_PROBE = """
import numpy as np
from cryoves._memory import kept_freed_memory, keeping

def rss():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]

with kept_freed_memory() as on:
    a = np.ones(200 * 2**20, np.uint8)
    del a
    inside = rss()
    b = np.ones(200 * 2**20, np.uint8)  # reuses the freed memory: no new pages
    reused = rss()
    del b
print(on, keeping(), inside, reused, rss())
"""


def _probe(env_value):
    env = {k: v for k, v in os.environ.items() if k != "CRYOVES_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["CRYOVES_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    on, still, inside, reused, after = out.stdout.split()
    return on == "True", still == "True", int(inside), int(reused), int(after)


@glibc
def test_freed_memory_is_kept_inside_the_block_and_returned_after_it():
    on, still, inside, reused, after = _probe(None)
    assert on and not still
    # the freed 200 MB (204,800 kB) stay in the process, a second array reuses them, and they are
    # returned to the system when the block ends
    assert inside - after > 150_000
    assert abs(reused - inside) < 20_000
    off_on, _, off_inside, _, off_after = _probe("0")
    assert not off_on
    assert abs(off_inside - off_after) < 50_000  # glibc's defaults: freed at once


@glibc
def test_blocks_nest_and_restore_only_at_the_outermost():
    assert not _memory.keeping()
    with _memory.kept_freed_memory() as outer:
        assert outer and _memory.keeping()
        with _memory.kept_freed_memory() as inner:
            assert inner and _memory.keeping()
        assert _memory.keeping()
        with _memory.kept_freed_memory(False) as off:  # not enabled: no change, the outer one lasts
            assert not off and _memory.keeping()
    assert not _memory.keeping()


def test_a_segmentation_predicted_here_keeps_memory(tmp_path, tomo, random_weights):
    # segment_one (the unit of cryoves segment and of a dask worker) runs its stages in a block
    from cryoves.batch import RunOptions, segment_one
    from cryoves.model import load_model
    from cryoves.pipeline import SegmentParams

    seen = set()

    def progress(stage, done, total):
        seen.add(_memory.keeping())

    segment_one(tomo, None, tmp_path / "out", RunOptions(weights=str(random_weights), formats=("csv",)),
                SegmentParams, lambda: load_model(random_weights), progress=progress)
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert seen == {expected}
    assert not _memory.keeping()  # restored after it


def _resident_fraction(a) -> float:
    """Fraction of the pages of array ``a`` that are in memory (Linux ``mincore``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-a.ctypes.data // page) * page  # the first whole page
    n = (a.ctypes.data + a.nbytes - start) // page
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / n


def test_prefaulted_array_is_handed_over_with_its_pages_written():
    """Prefaulted: the array of the asked shape and dtype, whose pages a background thread writes
    until take() stops it (Linux: all of them in memory once it ends; a fresh array of that
    size has none); after take() or discard() nothing more is handed out."""
    import time

    import numpy as np

    shape = (16, 1024, 1024)  # 64 MB: served by fresh mmap pages
    w = _memory.Prefaulted(shape, np.int32)
    deadline = time.monotonic() + 60
    while w._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    a = w.take()
    assert a.shape == shape and a.dtype == np.int32 and a.flags.c_contiguous and a.flags.writeable
    if sys.platform.startswith("linux"):
        assert _resident_fraction(np.empty(shape, np.int32)) < 0.1  # the check can tell
        assert _resident_fraction(a) == 1.0
    assert w.take() is None
    # stopped at once: the thread has ended, the array is whole
    w = _memory.Prefaulted((64, 256, 256), np.float32)
    b = w.take()
    assert b.shape == (64, 256, 256) and not w._thread.is_alive()
    w = _memory.Prefaulted((8, 8, 8), np.uint8)
    w.discard()
    assert w.take() is None and not w._thread.is_alive()
