"""The card's Gaussian smoothing along strided axes, computed on whole planes: scipy's numbers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryoves import _parallel
from cryoves import predict as P


@pytest.mark.parametrize("shape, sigma", [((40, 37, 29), 1.0), ((3, 5, 7), 1.0), ((21, 9, 30), 2.5), ((8, 40, 6), 0.6)])
def test_smoothing_equals_scipy_bit_for_bit(shape, sigma, monkeypatch):
    monkeypatch.setattr(_parallel, "n_cores", lambda: 3)  # several slabs per pass
    vol = (np.random.default_rng(7).normal(size=shape) * 100).astype(np.float32)
    ref = ndimage.gaussian_filter(vol, sigma, mode="nearest", truncate=4.0)
    got = vol.copy()
    P._smooth_inplace(got, sigma)
    assert P._planewise_ok()
    assert np.array_equal(got, ref)


def test_planewise_pass_is_used_on_strided_axes(monkeypatch):
    calls = []
    real = P._correlate_nearest_planewise
    monkeypatch.setattr(P, "_correlate_nearest_planewise", lambda b, w, ax, o: calls.append(ax) or real(b, w, ax, o))
    vol = np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float32)
    P._smooth_inplace(vol, 1.0)
    assert set(calls) == {0, 1}


def test_scipy_is_used_when_the_check_fails(monkeypatch):
    monkeypatch.setattr(P, "_planewise_ok", lambda: False)
    monkeypatch.setattr(P, "_correlate_nearest_planewise", lambda *a: pytest.fail("planewise pass used"))
    vol = np.random.default_rng(1).normal(size=(9, 10, 11)).astype(np.float32)
    ref = ndimage.gaussian_filter(vol, 1.0, mode="nearest", truncate=4.0)
    P._smooth_inplace(vol, 1.0)
    assert np.array_equal(vol, ref)
