"""Whole-volume work cut into slabs on several cores gives exactly the numbers of one call.

The Gaussian passes, the resampling zoom and the tile blending of :mod:`cryoves.predict`, and
the slab loops of :func:`cryoves.threshold.global_threshold` and
:func:`cryoves.threshold.add_weak_segments`, run on threads (:func:`cryoves._parallel.slab_map`);
each test checks that threads are really used and that the result is bit for bit that of the
plain (scipy / one-core) computation.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from scipy import ndimage

from cryoves import _parallel
from cryoves import predict as P
from cryoves import threshold as T
from cryoves.model import new_model
from cryoves.pipeline import SegmentParams, global_stage


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(_parallel, "n_cores", lambda: 4)


def _spy(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records the threads it ran on."""
    seen = set()
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def test_slab_step_and_map(monkeypatch):
    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    assert _parallel.slab_step(160, 113) == 80  # two slabs of 80, not 113 + 47
    assert _parallel.slab_step(300, 16) == 16  # the caller's bound
    got = _parallel.slab_map(lambda a, b: (a, b), 7, 100)
    assert got == [(0, 4), (4, 7)]
    monkeypatch.setattr(_parallel, "n_cores", lambda: 1)
    assert _parallel.slab_step(160, 113) == 113
    assert _parallel.slab_map(lambda a, b: (a, b), 160, 113) == [(0, 113), (113, 160)]


@pytest.mark.parametrize("shape", [(23, 31, 19), (5, 40, 3)])
def test_gaussian_passes_on_threads_equal_scipy(shape, four_cores, monkeypatch):
    rng = np.random.default_rng(3)
    vol = rng.normal(size=shape).astype(np.float32)
    seen = _spy(monkeypatch, ndimage, "gaussian_filter1d")
    for sigma in [(1.0, 1.0, 1.0), (0.4, 0.0, 1.7), (0.0, 0.0, 0.6)]:
        got = P._gaussian_filter(vol, sigma, mode="mirror")
        assert np.array_equal(got, ndimage.gaussian_filter(vol, sigma, mode="mirror")), sigma
    a = vol.copy()
    P._smooth_inplace(a, 1.0)
    assert np.array_equal(a, ndimage.gaussian_filter(vol, 1.0, mode="nearest", truncate=4.0))
    pre = {"smooth_sigma": 1.0, "normalization": {"method": "zscore"}, "invert": True}
    ref = ndimage.gaussian_filter(-vol, 1.0, mode="nearest", truncate=4.0)
    P._normalize_inplace(ref, pre["normalization"])
    assert np.array_equal(P.preprocess(vol, pre), ref)
    assert len(seen) >= 2  # really on several threads


@pytest.mark.parametrize("src, dst", [((40, 52, 37), (30, 39, 28)), ((30, 39, 28), (40, 52, 37)),
                                      ((9, 10, 11), (13, 7, 5))])
def test_resample_zoom_in_slabs_equals_scipy_zoom(src, dst, four_cores, monkeypatch):
    assert P._slab_zoom_ok()  # scipy's private zoom routine as expected (else the public zoom is used)
    rng = np.random.default_rng(4)
    vol = rng.normal(size=src).astype(np.float32)
    seen = _spy(monkeypatch, ndimage._nd_image, "zoom_shift")
    factors = tuple(o / i for o, i in zip(dst, src))
    for anti_alias in (False, True):
        ref = vol
        if anti_alias and any(f < 1 for f in factors):
            ref = ndimage.gaussian_filter(vol, [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors], mode="mirror")
        ref = ndimage.zoom(ref, factors, order=1, mode="nearest", grid_mode=True, prefilter=False)
        out = P.resample(vol, dst, anti_alias=anti_alias)
        assert out.shape == dst and out.dtype == np.float32
        assert np.array_equal(out, ref)
    assert len(seen) >= 2


def test_prediction_blended_on_threads_equals_one_core(monkeypatch):
    model = new_model(name="random-d1", seed=12, n_depth=1, n_filter_base=4, voxel_size_nm=1.0)
    rng = np.random.default_rng(5)
    tomo = ndimage.gaussian_filter(rng.normal(size=(20, 45, 38)), 1.5).astype(np.float32)
    kw = dict(tile_shape=(20, 24, 24), blend=4)  # several tiles along Y and X, overlapping ramps
    monkeypatch.setattr(_parallel, "n_cores", lambda: 1)
    one = P.predict_probability(tomo, 1.0, model, **kw)
    monkeypatch.setattr(_parallel, "n_cores", lambda: 4)
    calls = []
    real = P.slab_map

    def spy(func, n_planes, max_step):
        out = real(func, n_planes, max_step)
        calls.append((func.__name__, len(out)))
        return out

    monkeypatch.setattr(P, "slab_map", spy)
    many = P.predict_probability(tomo, 1.0, model, **kw)
    assert np.array_equal(one, many)
    assert ("add", 4) in calls  # the tiles were blended in four slabs
    assert any(name == "normalise" and n >= 2 for name, n in calls)


def test_global_stage_slabs_on_threads_equal_one_core(small_simulation, oracle_probability, monkeypatch):
    sim = small_simulation
    vs = sim.voxel_size
    # a weak map (the robust mode's weak segments are then searched) with a large-pass map
    prob = (0.7 * oracle_probability).astype(np.float32)
    large = np.where(oracle_probability > 0.5, oracle_probability, 0).astype(np.float32)
    params = SegmentParams()
    monkeypatch.setattr(T, "_SLAB_VOXELS", 3 * sim.tomogram.shape[1] * sim.tomogram.shape[2])  # many slabs
    monkeypatch.setattr(_parallel, "n_cores", lambda: 1)
    g1 = global_stage(sim.tomogram, prob, vs, params, large=large)
    monkeypatch.setattr(_parallel, "n_cores", lambda: 4)
    seen = _spy(monkeypatch, T, "_ball1_min")
    dil = _spy(monkeypatch, T, "_dilate6")
    g4 = global_stage(sim.tomogram, prob, vs, params, large=large)
    assert g1.threshold == g4.threshold
    assert np.array_equal(g1.shell_means, g4.shell_means, equal_nan=True)
    assert np.array_equal(g1.labels, g4.labels)
    assert g4.labels.max() > 0
    assert len(seen) >= 2 and len(dil) >= 2


def test_tensorflow_import_leaves_matplotlib_out():
    code = ("import sys, threading\n"
            "from cryoves._tf import import_keras\n"
            "res = {}\n"
            "def other():\n"  # another thread may import matplotlib meanwhile
            "    import matplotlib\n"
            "    res['other'] = matplotlib.__name__\n"
            "t = threading.Thread(target=other)\n"
            "import_keras()\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported with TensorFlow'\n"
            "t.start(); t.join()\n"
            "assert res.get('other') == 'matplotlib'\n"
            "import matplotlib.pyplot\n"  # and this thread later too
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_h_maxima_with_one_sort_equals_skimage(monkeypatch):
    import skimage.morphology.grayreconstruct as gr
    from skimage.morphology import h_maxima

    assert T._h_maxima_ok()
    calls = []
    real = gr.rank_order
    monkeypatch.setattr(gr, "rank_order", lambda img: (calls.append(1), real(img))[1])
    rng = np.random.default_rng(6)
    for i in range(12):
        shape = tuple(int(n) for n in rng.integers(6, 40, 3))
        seg = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
        smooth = ndimage.gaussian_filter(ndimage.distance_transform_edt(seg), 0.5)
        for h in (0.5, 0.05):
            n = len(calls)
            got = T._h_maxima(smooth, h)
            assert len(calls) == n  # skimage's reconstruction (and its second sort) not used
            want = h_maxima(smooth, h)
            assert len(calls) > n or h > np.ptp(smooth)
            assert got.dtype == want.dtype and np.array_equal(got, want), (shape, h)


def test_label_counts_on_threads_equal_bincount(four_cores, monkeypatch):
    rng = np.random.default_rng(7)
    lab, n = ndimage.label(ndimage.gaussian_filter(rng.random((30, 24, 20)), 1.5) > 0.55)
    lab = lab.astype(np.int32)
    monkeypatch.setattr(T, "_SLAB_VOXELS", 4 * 24 * 20)  # 8 slabs
    seen = _spy(monkeypatch, np, "bincount")
    for minlength in (0, 5, n + 10):
        assert np.array_equal(T._label_counts(lab, minlength=minlength), np.bincount(lab.ravel(), minlength=minlength))
    assert len(seen) >= 2
    assert np.array_equal(T._label_counts(np.zeros((6, 3, 3), np.int32)), [54])


def test_dilate6_equals_binary_dilation():
    rng = np.random.default_rng(9)
    st = T._structure(1)
    for shape in ((1, 1, 1), (1, 5, 4), (3, 1, 7), (9, 12, 10), (20, 17, 23)):
        for fill in (0.0, 0.02, 0.3):
            mask = rng.random(shape) < fill
            before = mask.copy()
            for it in (0, 1, 2, 3):
                want = ndimage.binary_dilation(mask, structure=st, iterations=it) if it else mask
                got = T._dilate6(mask, it)
                assert got.dtype == bool and np.array_equal(got, want), (shape, fill, it)
            assert np.array_equal(mask, before)  # the input is not modified


def test_label_volumes_equal_segment_stats():
    rng = np.random.default_rng(8)
    lab, n = ndimage.label(ndimage.gaussian_filter(rng.random((30, 40, 35)), 1.5) > 0.55)
    lab = lab.astype(np.int32)
    lab[lab == 3] = 0  # a missing label
    stats = T.segment_stats(lab)
    labs, vols = T._label_volumes(lab)
    assert n > 5 and 3 not in labs
    assert np.array_equal(labs, stats["label"]) and labs.dtype == stats["label"].dtype
    assert np.array_equal(vols, stats["volume"]) and vols.dtype == stats["volume"].dtype
