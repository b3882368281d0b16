"""Helper processes of the per-vesicle stages (cryoves._workers): the same results as threads."""

import os
import time

import numpy as np
import pytest

from cryoves import VesicleTable, _workers
from cryoves.outliers import _row_measures, filter_outliers
from cryoves.refine import intensity_normalization, refine_spheres

from _synthetic import draw_vesicles, random_vesicles

VOXEL = 2.0
SHAPE = (48, 160, 160)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A synthetic tomogram of 80 vesicles as a memory-mapped file (helpers read it from there)."""
    centers, radii = random_vesicles(SHAPE, 80, r_range=(6, 9), seed=3)
    tomo = draw_vesicles(SHAPE, centers, radii, thickness=2.0, noise=1.0, seed=4).astype(np.float32)
    path = tmp_path_factory.mktemp("workers") / "tomo.raw"
    tomo.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=SHAPE)
    return mm, centers, radii


@pytest.fixture
def helpers(monkeypatch):
    """One helper process (as on 2 cores), ended after the test."""
    monkeypatch.setattr(_workers, "n_cores", lambda: 2)
    monkeypatch.delenv("CRYOVES_HELPERS", raising=False)
    _workers.shutdown()
    hs = _workers.start()
    assert len(hs) == 1
    yield hs
    _workers.shutdown()


def _items(volume):
    mm, centers, radii = volume
    rng = np.random.default_rng(0)
    return [(c + rng.normal(0, 0.3, 3), r, 2.0) for c, r in zip(centers, radii)]


def test_volume_source_of_memmaps_and_arrays(volume, tmp_path):
    mm = volume[0]
    src = _workers.volume_source(mm)
    assert src[1:4] == ("<f4", 0, SHAPE)
    st = os.stat(src[0])
    assert src[4] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    view = mm[4:]  # a view of the map: its own offset
    assert _workers.volume_source(view)[2] == 4 * SHAPE[1] * SHAPE[2] * 4
    assert _workers.volume_source(np.asarray(mm) + 0) is None  # in memory
    assert _workers.volume_source(mm[:, ::2]) is None  # not contiguous


def test_vesicle_map_on_helpers_equals_a_loop(volume, helpers):
    mm = volume[0]
    items = _items(volume)
    norm = intensity_normalization(mm)
    want = [_row_measures(mm, it, norm, True, True) for it in items]
    got = list(_workers.vesicle_map(_row_measures, mm, items, (norm, True, True)))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert helpers[0].source == _workers.volume_source(mm)  # the helper computed chunks


def test_refine_and_outliers_with_helpers_equal_threads(volume, helpers, monkeypatch):
    mm, centers, radii = volume
    rng = np.random.default_rng(1)
    start = VesicleTable.from_arrays(centers + rng.normal(0, 1.0, centers.shape), radii * 1.1, voxel_size=VOXEL)
    with_h = refine_spheres(mm, start, VOXEL)
    out_h = filter_outliers(mm, with_h, VOXEL, min_radius_nm=10.0)
    assert helpers[0].source is not None
    monkeypatch.setenv("CRYOVES_HELPERS", "0")
    plain = refine_spheres(mm, start, VOXEL)
    out_p = filter_outliers(mm, plain, VOXEL, min_radius_nm=10.0)
    for a, b in ((with_h, plain), (out_h, out_p)):
        da, db = a.to_dict(nm=False), b.to_dict(nm=False)
        assert set(da) == set(db)
        for k in da:
            x, y = np.asarray(da[k]), np.asarray(db[k])
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k
    assert np.sum(out_h["status"] == "accepted") > 60


def test_a_replaced_file_is_never_read_by_a_helper(volume, helpers, tmp_path):
    """The helpers read what this process maps: a file replaced on disk is mapped again, or the
    old mapping is worked on here."""
    mm = volume[0]
    items = _items(volume)
    path = tmp_path / "t.raw"
    np.asarray(mm).tofile(path)
    a = np.memmap(path, dtype=np.float32, mode="r", shape=SHAPE)
    got_a = list(_workers.vesicle_map(_row_measures, a, items, ((0.0, 1.0), False, True)))
    assert helpers[0].source[0] == str(path)
    # a new file under the same name (a new inode): other values
    other = tmp_path / "t2.raw"
    (np.asarray(mm)[:, ::-1, :] * 1.0).astype(np.float32).tofile(other)
    os.replace(other, path)
    assert _workers.volume_source(a) is None  # the old mapping is not the file at its path
    again_a = list(_workers.vesicle_map(_row_measures, a, items, ((0.0, 1.0), False, True)))
    np.testing.assert_array_equal(np.array(again_a), np.array(got_a))  # on threads, from a's data
    b = np.memmap(path, dtype=np.float32, mode="r", shape=SHAPE)
    want_b = [_row_measures(b, it, (0.0, 1.0), False, True) for it in items]
    got_b = list(_workers.vesicle_map(_row_measures, b, items, ((0.0, 1.0), False, True)))
    np.testing.assert_array_equal(np.array(got_b), np.array(want_b))
    assert not np.array_equal(np.array(got_b), np.array(got_a))
    assert helpers[0].source == _workers.volume_source(b)  # mapped again


def test_a_helper_that_cannot_map_the_file_leaves_its_chunks_here(volume, helpers, monkeypatch):
    mm = volume[0]
    items = _items(volume)
    real = _workers.volume_source
    # a changed identity (as if the file changed between this process's check and the helper's)
    monkeypatch.setattr(_workers, "volume_source", lambda t: real(t)[:4] + ((0, 0, 0, 0),))
    want = [_row_measures(mm, it, (0.0, 1.0), True, False) for it in items]
    got = list(_workers.vesicle_map(_row_measures, mm, items, ((0.0, 1.0), True, False)))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert _workers.start() == helpers and helpers[0].source is None  # kept, and sent again next time


def test_what_a_helper_cannot_take_is_computed_here(volume, helpers):
    mm = volume[0]
    items = _items(volume)
    # a local function (no name to find it by): threads, the helper never asked
    local = lambda t, it, norm: _row_measures(t, it, norm, False, True)  # noqa: E731
    got = list(_workers.vesicle_map(local, mm, items, ((0.0, 1.0),)))
    want = [_row_measures(mm, it, (0.0, 1.0), False, True) for it in items]
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert helpers[0].source is None
    # an argument that cannot be pickled: each chunk a helper would take is computed here
    import threading

    class Norm(tuple):
        lock = threading.Lock()  # not picklable

        def __reduce__(self):
            raise TypeError("cannot pickle this normalisation")

    got = list(_workers.vesicle_map(_row_measures, mm, items, (Norm((0.0, 1.0)), False, True)))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert _workers.start() == helpers  # the helper is kept


def test_an_error_in_a_helper_is_raised_here(volume, helpers):
    mm = volume[0]
    items = _items(volume)
    items[-1] = (np.zeros(3), 5.0)  # two values where three are unpacked
    with pytest.raises(ValueError, match="unpack"):
        list(_workers.vesicle_map(_row_measures, mm, items, ((0.0, 1.0), True, True)))
    # the helper lives on
    ok = list(_workers.vesicle_map(_row_measures, mm, _items(volume), ((0.0, 1.0), False, True)))
    assert len(ok) == len(items) and _workers.start() == helpers


def test_a_dead_helper_is_dropped_and_its_chunks_computed_here(volume, helpers):
    mm = volume[0]
    items = _items(volume)
    want = [_row_measures(mm, it, (0.0, 1.0), True, False) for it in items]
    helpers[0].proc.kill()
    helpers[0].proc.wait()
    dead = helpers[0]
    got = list(_workers.vesicle_map(_row_measures, mm, items, ((0.0, 1.0), True, False)))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    now = _workers.start()  # the dead one dropped, another started
    assert dead not in now and len(now) == 1 and now[0].proc.poll() is None
    got = list(_workers.vesicle_map(_row_measures, mm, items, ((0.0, 1.0), True, False)))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert now[0].source is not None


def test_an_idle_helper_ends_and_another_starts(volume, monkeypatch):
    monkeypatch.setattr(_workers, "n_cores", lambda: 2)
    monkeypatch.delenv("CRYOVES_HELPERS", raising=False)
    monkeypatch.setattr(_workers, "IDLE_SECONDS", 1.0)  # given to the helpers started now
    _workers.shutdown()
    try:
        h = _workers.start()[0]
        h.proc.wait(timeout=30)  # ends by itself once idle
        mm = volume[0]
        items = _items(volume)
        got = list(_workers.vesicle_map(_row_measures, mm, items, ((0.0, 1.0), False, True)))
        want = [_row_measures(mm, it, (0.0, 1.0), False, True) for it in items]
        np.testing.assert_array_equal(np.array(got), np.array(want))
        now = _workers.start()
        assert h not in now and len(now) == 1 and now[0].source is not None  # another did the work
    finally:
        _workers.shutdown()


def test_stopping_early_awaits_the_running_chunks(volume, helpers):
    mm = volume[0]
    items = _items(volume) * 40  # 3,200 rows: seconds of work if every chunk still ran
    norm = ((0.0, 1.0), True, True)
    t0 = time.perf_counter()
    for it in items[:40]:
        _row_measures(mm, it, *norm)
    per_item = (time.perf_counter() - t0) / 40
    gen = _workers.vesicle_map(_row_measures, mm, items, norm)
    first = next(gen)
    t0 = time.perf_counter()
    gen.close()  # as a progress callback raising Cancelled does
    took = time.perf_counter() - t0
    assert len(first) == 3
    # only the chunks already running are finished (8 rows each), not the other ~3,000 rows
    assert took < 0.25 * per_item * len(items), (took, per_item)
    again = list(_workers.vesicle_map(_row_measures, mm, items[:70], norm))
    assert len(again) == 70


def test_helpers_off_by_environment_one_core_or_in_memory(volume, monkeypatch):
    _workers.shutdown()
    monkeypatch.setattr(_workers, "n_cores", lambda: 2)
    monkeypatch.setenv("CRYOVES_HELPERS", "0")
    assert not _workers.enabled() and _workers.start() == []
    _workers.shutdown()
    monkeypatch.delenv("CRYOVES_HELPERS")
    monkeypatch.setattr(_workers, "n_cores", lambda: 1)
    assert _workers.start() == []
    _workers.shutdown()
    monkeypatch.setattr(_workers, "n_cores", lambda: 2)
    import sys

    monkeypatch.setattr(sys, "frozen", True, raising=False)  # a frozen application: no Python to start
    assert not _workers.enabled() and _workers.start() == []
    monkeypatch.delattr(sys, "frozen")
    _workers.set_enabled(False)
    try:
        assert _workers.start() == []
    finally:
        _workers.set_enabled(True)
        _workers.shutdown()
    # an array in memory is worked on threads, without starting helpers for it
    mm = volume[0]
    arr = np.array(mm)
    out = list(_workers.vesicle_map(_row_measures, arr, _items(volume), ((0.0, 1.0), False, True)))
    assert len(out) == 80
    assert all(h.source is None for h in _workers.start())
    _workers.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_helpers_end_with_their_parent(tmp_path):
    import subprocess
    import sys

    code = ("import os, sys, time\n"
            "from cryoves import _workers\n"
            "_workers.n_cores = lambda: 2\n"
            "hs = _workers.start()\n"
            "print(hs[0].proc.pid, flush=True)\n"
            "os._exit(0)\n")  # no clean-up: the helper sees its pipe close
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[0])
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] in "ZX":
                    break  # ended (a zombie until someone reaps it)
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"helper {pid} still runs after its parent ended")


def test_segment_starts_the_helpers_for_a_file_backed_tomogram(tmp_path, tomo, random_weights, capsys,
                                                             monkeypatch):
    from cryoves.cli import main

    calls = []
    real = _workers.start_for
    monkeypatch.setattr(_workers, "start_for", lambda t: calls.append(_workers.volume_source(t)) or real(t))
    monkeypatch.setattr(_workers, "start", lambda: [])  # no processes in this test
    rc = main(["segment", str(tomo), "--out", str(tmp_path / "out"), "--weights", str(random_weights), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert len(calls) == 1 and calls[0][0] == str(tomo)  # the tomogram, read memory-mapped


def test_start_for_only_file_backed_tomograms(volume, monkeypatch):
    started = []
    monkeypatch.setattr(_workers, "start", lambda: started.append(1) or ["h"])
    monkeypatch.setattr(_workers, "n_cores", lambda: 2)
    monkeypatch.delenv("CRYOVES_HELPERS", raising=False)
    assert _workers.start_for(np.zeros((4, 4, 4), np.float32)) == [] and not started
    assert _workers.start_for(volume[0]) == ["h"] and started == [1]
    monkeypatch.setenv("CRYOVES_HELPERS", "0")
    assert _workers.start_for(volume[0]) == [] and started == [1]
