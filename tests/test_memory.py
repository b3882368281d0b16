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


def test_prefaulted_array_is_handed_over_with_its_pages_written():
    """Prefaulted: the array of the asked shape and dtype; a background thread writes every page
    (zeros) until take() stops it; after take() or discard() nothing more is handed out."""
    import threading
    import time

    import numpy as np

    w = _memory.Prefaulted((40, 64, 64), np.int32)
    deadline = time.monotonic() + 30
    while w._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    a = w.take()
    assert a.shape == (40, 64, 64) and a.dtype == np.int32 and a.flags.c_contiguous and a.flags.writeable
    if sys.platform.startswith("linux"):  # touched (one byte per 4 KiB page, zeros): Linux only
        assert not np.any(a.reshape(-1).view(np.uint8)[::4096])
    assert w.take() is None
    # stopped at once: the thread ends, the array is still whole
    w = _memory.Prefaulted((64, 256, 256), np.float32)
    b = w.take()
    assert b.shape == (64, 256, 256) and not w._thread.is_alive()
    w = _memory.Prefaulted((8, 8, 8), np.uint8)
    w.discard()
    assert w.take() is None and not any(t.name == "cryoves-prefault" and t is w._thread and t.is_alive()
                                        for t in threading.enumerate())
