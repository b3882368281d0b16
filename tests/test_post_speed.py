"""Post-processing speed-ups that must not change results (issue 11)."""

import math

import numpy as np
import pytest
import scipy.fft as sfft

from cryoves import refine


def _peak_full(G, nf, max_shift):
    """The peak search on the full inverse FFT (the code before the partial inverse)."""
    cc = sfft.irfftn(G, (nf, nf, nf), workers=1)
    k = int(math.ceil(max_shift))
    idx = np.r_[0:k + 1, nf - k:nf]
    sub = cc[np.ix_(idx, idx, idx)]
    offs = np.r_[0:k + 1, -k:0].astype(float)
    r2 = offs[:, None, None] ** 2 + offs[None, :, None] ** 2 + offs[None, None, :] ** 2
    sub = np.where(r2 <= max_shift ** 2 + 1e-9, sub, -np.inf)
    p = np.unravel_index(int(np.argmax(sub)), sub.shape)
    best = float(sub[p])
    shift = np.array([offs[p[0]], offs[p[1]], offs[p[2]]])
    pz, py, px = (int(s) % nf for s in shift)
    lines = ((pz, cc[:, py, px]), (py, cc[pz, :, px]), (px, cc[pz, py, :]))
    for axis, (q, line) in enumerate(lines):
        a, b, c = line[(q - 1) % nf], line[q], line[(q + 1) % nf]
        den = a - 2 * b + c
        if den < 0:
            shift[axis] += float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    return best, shift


@pytest.mark.parametrize("nf", [8, 15, 27, 32, 36, 45])
def test_irfftn_at_is_irfftn_bit_for_bit(nf):
    rng = np.random.default_rng(nf)
    G = sfft.rfftn(rng.standard_normal((nf, nf, nf)))
    k = min(3, (nf - 1) // 2)
    rows = np.r_[0:k + 1, nf - k:nf]
    full = sfft.irfftn(G, (nf, nf, nf), workers=1)[np.ix_(rows, rows, rows)]
    assert np.array_equal(refine._irfftn_at(G, nf, rows), full)


@pytest.mark.parametrize("nf,max_shift", [(9, 1.0), (16, 1.5), (27, 3.0), (32, 2.5), (40, 3.0), (45, 5.0)])
def test_peak_from_spectrum_equals_full_inverse(nf, max_shift):
    rng = np.random.default_rng(int(nf * 10 + max_shift))
    for _ in range(4):
        # a smooth correlation with a peak near the origin, and plain noise
        x = rng.standard_normal((nf, nf, nf))
        G = sfft.rfftn(x)
        assert refine._peak_from_spectrum(G, nf, max_shift)[0] == _peak_full(G, nf, max_shift)[0]
        np.testing.assert_array_equal(refine._peak_from_spectrum(G, nf, max_shift)[1],
                                      _peak_full(G, nf, max_shift)[1])
        c = np.array([rng.uniform(-1, 1) for _ in range(3)])
        ax = np.fft.fftfreq(nf, 1.0 / nf)
        d2 = ((ax[:, None, None] - c[0]) ** 2 + (ax[None, :, None] - c[1]) ** 2 + (ax[None, None, :] - c[2]) ** 2)
        G = sfft.rfftn(np.exp(-d2 / 4.0) + 0.01 * x)
        best, shift = refine._peak_from_spectrum(G, nf, max_shift)
        b0, s0 = _peak_full(G, nf, max_shift)
        assert best == b0
        np.testing.assert_array_equal(shift, s0)
        assert np.all(np.abs(shift - c) < 0.3)


def _two_vesicle_scene():
    from _synthetic import draw_vesicles

    vs = 2.0
    shape = (40, 64, 80)
    centers = np.array([[20.0, 32.0, 28.0], [20.0, 32.0, 44.0], [20.0, 14.0, 64.0]])
    radii = np.array([8.0, 8.0, 6.0])
    tomo = draw_vesicles(shape, centers, radii, thickness=2.0, noise=0.3, seed=5)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    prob = np.zeros(shape, np.float32)
    for c, r in zip(centers, radii):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        prob = np.maximum(prob, (1.0 / (1.0 + np.exp(d - r))).astype(np.float32))
    return tomo, prob, vs, centers


@pytest.mark.parametrize("fragment_radius_nm", [None, 0.0])
def test_add_weak_segments_in_place_equals_copy(fragment_radius_nm):
    """``overwrite_labels=True`` works in the caller's labels (no second label volume) and gives
    the labels of the copying default, released fragments restored included."""
    from cryoves.threshold import add_weak_segments

    tomo, prob, vs, centers = _two_vesicle_scene()
    labels = np.zeros(prob.shape, np.int32)
    labels[prob >= 0.9] = 1           # the two touching vesicles as one trusted segment
    labels[18:21, 12:15, 62:65] = 7   # a fragment inside the third (weak) vesicle
    labels[2:4, 2:4, 2:4] = 9         # a fragment nowhere near a vesicle: restored
    weak = np.where(labels == 1, prob, 0.6 * prob).astype(np.float32)
    kw = dict(low_threshold=0.3, min_radius_nm=8.0, max_radius_nm=30.0, min_weak_fraction=0.0,
              fragment_radius_nm=fragment_radius_nm)
    before = labels.copy()
    ref = add_weak_segments(tomo, weak, labels, vs, **kw)
    np.testing.assert_array_equal(labels, before)  # default: input untouched
    work = labels.copy()
    out = add_weak_segments(tomo, weak, work, vs, overwrite_labels=True, **kw)
    assert out is work
    np.testing.assert_array_equal(out, ref)
    assert out[2, 2, 2] == 9
    if fragment_radius_nm is None:  # fragment 7 released: the weak vesicle around it is added
        assert out.max() > 9 and out[20, 14, 64] > 9


def test_adaptive_threshold_in_place_equals_copy():
    from cryoves.threshold import adaptive_threshold, global_threshold

    tomo, prob, vs, centers = _two_vesicle_scene()
    g = global_threshold(tomo, prob)
    labels = g.labels
    before = labels.copy()
    ref = adaptive_threshold(prob, labels, g.threshold, vs, min_radius_nm=6.0)
    np.testing.assert_array_equal(labels, before)
    out = adaptive_threshold(prob, labels, g.threshold, vs, min_radius_nm=6.0, overwrite_labels=True)
    assert out is labels
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(ref)) - 1 == 3  # the touching pair was split: the stage did its work


def test_initial_spheres_from_labels_makes_no_volume_copy():
    """The starting spheres are read from int32 labels without an int64 copy of the volume."""
    import tracemalloc

    from cryoves.refine import initial_spheres_from_labels

    labels = np.zeros((64, 128, 128), np.int32)
    labels[10:20, 10:20, 10:20] = 1
    labels[30:40, 50:60, 70:80] = 2
    tracemalloc.start()
    try:
        t = initial_spheres_from_labels(labels, 2.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(t) == 2
    np.testing.assert_allclose(t.centers, [[14.5, 14.5, 14.5], [34.5, 54.5, 74.5]])
    assert peak < 0.5 * labels.nbytes
