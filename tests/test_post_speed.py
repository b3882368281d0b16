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
