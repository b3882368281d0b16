"""Per-vesicle work on several cores gives exactly the results of a plain loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cryoves import _parallel
from cryoves.outliers import filter_outliers
from cryoves.refine import refine_spheres
from cryoves.table import VesicleTable


def test_thread_map_order_threads_and_cancel(monkeypatch):
    monkeypatch.setattr(_parallel, "n_cores", lambda: 4)
    seen = set()

    def slow_square(x):
        seen.add(threading.get_ident())
        time.sleep(0.002 * (x % 3))
        return x * x

    assert list(_parallel.thread_map(slow_square, range(40))) == [x * x for x in range(40)]
    assert len(seen) >= 2  # really on several threads
    seen.clear()
    assert list(_parallel.thread_map(slow_square, range(5))) == [0, 1, 4, 9, 16]
    assert seen == {threading.get_ident()}  # few items: in the calling thread
    monkeypatch.setattr(_parallel, "n_cores", lambda: 1)
    seen.clear()
    assert list(_parallel.thread_map(slow_square, range(40)))[-1] == 39 * 39
    assert seen == {threading.get_ident()}
    # a consumer that stops early (a cancelled stage) cancels the calls not yet started
    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    assert _started_after_early_stop(_parallel.thread_map) < 200


def _started_after_early_stop(mapper, **kw) -> int:
    """Calls started by ``mapper`` over 200 slow items when its consumer stops at the 4th result;
    checks that none starts afterwards (the rest were cancelled)."""
    started = []

    def work(x):
        started.append(x)
        time.sleep(0.01)
        return x

    for x in mapper(work, range(200), **kw):
        if x == 3:
            break
    n = len(started)
    time.sleep(0.05)
    assert len(started) == n
    return n


def test_thread_imap_order_window_overlap_and_cancel(monkeypatch):
    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    drawn = []

    def items(n):
        for x in range(n):
            drawn.append(x)
            yield x

    def slow_square(x):
        time.sleep(0.002 * (x % 3))
        return x * x

    # order kept; the items are taken lazily, at most `window` ahead of what was yielded
    out = []
    for k, y in enumerate(_parallel.thread_imap(slow_square, items(60), window=8)):
        out.append(y)
        assert len(drawn) <= k + 1 + 8
    assert out == [x * x for x in range(60)]
    # the threads keep working while the consumer handles a result (no batch boundary): a slow
    # consumer and slow calls overlap. 20 calls of 0.05 s on 2 threads, 0.05 s per result in the
    # consumer: ~1.0 s overlapped; batches of 4 (compute, then consume) would take 5 x 0.3 = 1.5 s
    def work(x):
        time.sleep(0.05)
        return x

    t0 = time.perf_counter()
    for _ in _parallel.thread_imap(work, range(20), window=4):
        time.sleep(0.05)
    assert time.perf_counter() - t0 < 1.25
    # one core: a plain loop in the calling thread
    monkeypatch.setattr(_parallel, "n_cores", lambda: 1)
    seen = set()

    def where(x):
        seen.add(threading.get_ident())
        return x

    assert list(_parallel.thread_imap(where, range(10))) == list(range(10))
    assert seen == {threading.get_ident()}
    # a consumer that stops early cancels the calls not yet started
    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    assert _started_after_early_stop(_parallel.thread_imap, window=16) <= 3 + 16 + 1


def test_refine_and_outliers_on_threads_equal_a_loop(monkeypatch, small_simulation):
    sim = small_simulation
    start = sim.table.copy()
    rng = np.random.default_rng(0)
    start["z"] = start["z"] + rng.uniform(-1.5, 1.5, len(start))
    start["radius"] = start["radius"] * rng.uniform(0.9, 1.1, len(start))
    monkeypatch.setattr(_parallel, "MIN_ITEMS", 2)  # threads for these few rows too
    assert len(start) >= 5
    import cryoves.outliers as outliers_mod
    import cryoves.refine as refine_mod

    threads = {"fit": set(), "score": set()}

    def spy(kind, func):
        def wrapped(*args, **kw):
            threads[kind].add(threading.get_ident())
            return func(*args, **kw)
        return wrapped

    monkeypatch.setattr(refine_mod, "fit_sphere", spy("fit", refine_mod.fit_sphere))
    monkeypatch.setattr(outliers_mod, "detection_score", spy("score", outliers_mod.detection_score))
    out = {}
    for cores in (1, 2):
        monkeypatch.setattr(_parallel, "n_cores", lambda c=cores: c)
        for v in threads.values():
            v.clear()
        refined = refine_spheres(sim.tomogram, start, sim.voxel_size)
        out[cores] = (refined, filter_outliers(sim.tomogram, refined, sim.voxel_size, min_radius_nm=10.0))
        main = {threading.get_ident()}
        if cores == 1:
            assert threads["fit"] == main and threads["score"] == main
        else:  # the fits and the scores ran on worker threads
            assert threads["fit"] - main and threads["score"] - main
    for a, b in zip(out[1], out[2]):
        assert isinstance(a, VesicleTable)
        for col in ("z", "y", "x", "radius", "thickness", "density", "pvalue"):
            np.testing.assert_array_equal(a[col], b[col], err_msg=col)
        assert list(a["status"]) == list(b["status"]) and list(a["note"]) == list(b["note"])


def test_outlier_refits_on_threads_equal_a_loop(monkeypatch, small_simulation):
    """The pending outliers of a round are re-fitted on the cores: the same table as one core."""
    import cryoves.outliers as outliers_mod

    sim = small_simulation
    refined = refine_spheres(sim.tomogram, sim.table, sim.voxel_size)
    bad = refined.copy()
    r, th, z = bad["radius"].copy(), bad["thickness"].copy(), bad["z"].copy()
    for i in (0, 1, 2):  # wrong fits: atypical features, re-fitted by the outlier stage
        r[i] *= 1.3
        th[i] *= 3.0
        z[i] += 2.0
    bad["radius"], bad["thickness"], bad["z"] = r, th, z
    threads = set()

    def spy(*args, **kw):
        threads.add(threading.get_ident())
        return fit(*args, **kw)

    fit = outliers_mod.fit_sphere
    monkeypatch.setattr(outliers_mod, "fit_sphere", spy)
    out = {}
    for cores in (1, 2):
        monkeypatch.setattr(_parallel, "n_cores", lambda c=cores: c)
        threads.clear()
        out[cores] = filter_outliers(sim.tomogram, bad, sim.voxel_size, min_radius_nm=10.0, keep_score=None)
        main = {threading.get_ident()}
        assert threads, "nothing was re-fitted"
        assert (threads == main) if cores == 1 else bool(threads - main)
    a, b = out[1], out[2]
    for col in ("z", "y", "x", "radius", "thickness", "density", "pvalue"):
        np.testing.assert_array_equal(a[col], b[col], err_msg=col)
    assert list(a["status"]) == list(b["status"]) and list(a["note"]) == list(b["note"])
