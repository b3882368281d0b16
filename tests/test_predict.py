"""Tests of cryoves.predict: tiling, blending, resampling, normalisation, TTA, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryoves import Cancelled
from cryoves.model import get_model, new_model
from cryoves.predict import normalize, plan_tiles, predict_probability, preprocess, resample
from cryoves.table import check_voxel_size


def _convs(model):
    return [lyr for lyr in model.keras_model.layers if type(lyr).__name__ == "Conv3D"]


@pytest.fixture(scope="module")
def random_model():
    """Small randomly initialised depth-2 U-Net whose output really varies."""
    model = new_model(name="random-d2", seed=11, n_filter_base=4, voxel_size_nm=1.0)
    last = _convs(model)[-1]
    w, b = last.get_weights()
    last.set_weights([w * 40.0, b])  # spread the sigmoid's input: outputs ~0.1..0.9
    model.invalidate_inference_model()
    return model


@pytest.fixture(scope="module")
def shallow_model():
    """Depth-1 version (receptive-field radius 9) for fast tiling tests."""
    model = new_model(name="random-d1", seed=12, n_depth=1, n_filter_base=4, voxel_size_nm=1.0)
    last = _convs(model)[-1]
    w, b = last.get_weights()
    last.set_weights([w * 40.0, b])
    model.invalidate_inference_model()
    return model


def _passthrough_model(voxel_size_nm):
    """A depth-1 U-Net with hand-set weights: prob = sigmoid(10 * x_norm - 5).

    Every convolution passes channel 0 of its input through its centre tap (the
    decoder takes the skip connection), so the network is a pointwise monotone map of
    the normalised tomogram: where the input is brightest, the probability peaks.
    """
    model = new_model(name="passthrough", n_depth=1, n_filter_base=2, batch_norm=False,
                      voxel_size_nm=voxel_size_nm,
                      normalization={"method": "percentile", "p_low": 1.0, "p_high": 99.9})
    for lyr in _convs(model):
        w, b = lyr.get_weights()
        w = np.zeros_like(w)
        b = np.zeros_like(b)
        c = w.shape[0] // 2
        if lyr.name.startswith("middle"):
            pass
        elif lyr.name.startswith("up_level_0_no_0"):
            n_in = w.shape[3]
            w[c, c, c, n_in - 2, 0] = 1.0  # first channel of the skip (after up-sampled ones)
        elif w.shape[:3] == (1, 1, 1):
            w[0, 0, 0, 0, 0] = 10.0
            b[0] = -5.0
        else:
            w[c, c, c, 0, 0] = 1.0
        lyr.set_weights([w, b])
    model.invalidate_inference_model()
    return model


def _blob(shape, center, sigma):
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    d2 = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
    return np.exp(-0.5 * d2 / sigma ** 2)


# ------------------------------------------------------------------------- basics
def test_odd_shape_float32_and_input_untouched(random_model):
    rng = np.random.default_rng(0)
    tomo = rng.normal(size=(37, 61, 53)).astype(np.float32)
    before = tomo.copy()
    prob = predict_probability(tomo, 1.0, random_model)
    assert prob.shape == tomo.shape and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1)) and prob.std() > 0.01
    np.testing.assert_array_equal(tomo, before)
    # other dtypes and a resampled grid give the input shape as well
    prob16 = predict_probability((tomo * 100).astype(np.int16), 1.3, random_model)
    assert prob16.shape == tomo.shape and prob16.dtype == np.float32


def test_volume_smaller_than_a_tile(random_model):
    for shape in [(3, 5, 2), (1, 1, 1), (7, 9, 11)]:
        tomo = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        prob = predict_probability(tomo, 1.0, random_model)
        assert prob.shape == shape and np.isfinite(prob).all()


# ------------------------------------------------------------------------- tiling
def test_tiled_equals_whole_volume_pass_depth2(random_model):
    rng = np.random.default_rng(2)
    tomo = ndimage.gaussian_filter(rng.normal(size=(32, 118, 62)), 1.0).astype(np.float32)
    whole = predict_probability(tomo, 1.0, random_model)  # one tile
    calls = []
    tiled = predict_probability(tomo, 1.0, random_model, tile_shape=(32, 64, 64), blend=4,
                                batch_size=2, progress=lambda *a: calls.append(a))
    assert len(calls) > 2 and calls[-1][1] == calls[-1][2]
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_tiled_equals_whole_volume_pass_depth1_all_axes(shallow_model):
    rng = np.random.default_rng(3)
    tomo = rng.normal(size=(45, 83, 70)).astype(np.float32)
    whole = predict_probability(tomo, 1.0, shallow_model)
    tiled = predict_probability(tomo, 1.0, shallow_model, tile_shape=(32, 36, 40))
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    # a halo below the receptive field is an approximation, but blended without seams
    approx = predict_probability(tomo, 1.0, shallow_model, tile_shape=(32, 36, 40), halo=3)
    err = np.abs(approx - whole)
    assert err.max() < 0.2 and err.mean() < 0.01


def test_plan_tiles_properties():
    for shape in [(200, 512, 512), (37, 61, 53), (64, 300, 129), (5, 1000, 7)]:
        for budget in (2_000_000, 9_000_000):
            plan = plan_tiles(shape, divisor=4, halo=23, blend=8, max_tile_voxels=budget)
            assert all(t % 4 == 0 for t in plan.tile_shape)
            assert all(p % 4 == 0 and p >= s for p, s in zip(plan.shape, shape))
            for ax in range(3):
                starts = plan.starts[ax]
                assert all(s % 4 == 0 for s in starts)
                assert starts[-1] + plan.tile_shape[ax] == plan.shape[ax]
                total = sum(np.pad(plan.axis_weights(ax, s), (s, plan.shape[ax] - s
                                   - plan.tile_shape[ax])) for s in starts)
                assert np.all(total > 0)  # every voxel is covered by a kept region
    big = plan_tiles((200, 512, 512))
    assert big.tile_shape[0] == 200  # whole depth
    assert big.overhead((200 * 512 * 512)) < 1.5
    with pytest.raises(ValueError, match="too small for halo"):
        plan_tiles((64, 64, 64), halo=23, tile_shape=(32, 32, 32))


# ------------------------------------------------------------------------- resampling
def test_resample_grid_alignment():
    shape = (30, 40, 50)
    center = (12.3, 20.0, 31.7)
    vol = _blob(shape, center, 3.0).astype(np.float32)
    for out_shape in [(15, 20, 25), (45, 60, 75), (21, 29, 33)]:
        out = resample(vol, out_shape)
        scale = np.array(out_shape) / np.array(shape)
        com = np.array(ndimage.center_of_mass(out))
        expected = (np.array(center) + 0.5) * scale - 0.5
        np.testing.assert_allclose(com, expected, atol=0.15)
        back = resample(out, shape, anti_alias=False)
        assert back.shape == shape
        np.testing.assert_allclose(ndimage.center_of_mass(back), center, atol=0.2)


@pytest.mark.parametrize("model_vs", [1.0, 1.7, 0.8])
def test_peak_stays_put_when_resampled(model_vs):
    """A bright blob's probability peak is where the blob is, whatever the model grid."""
    model = _passthrough_model(model_vs)
    shape = (40, 56, 64)
    centers = [(14.0, 20.0, 22.0), (26.5, 37.3, 44.8)]
    vol = sum(_blob(shape, c, 3.0) for c in centers).astype(np.float32)
    vol += np.random.default_rng(4).normal(0, 0.01, shape).astype(np.float32)
    prob = predict_probability(vol, 1.0, model)
    assert prob.shape == shape
    for c in centers:
        sl = tuple(slice(int(v) - 6, int(v) + 7) for v in c)
        patch = prob[sl] - prob.min()
        com = np.array(ndimage.center_of_mass(patch)) + [s.start for s in sl]
        np.testing.assert_allclose(com, c, atol=0.15)
        peak = np.unravel_index(np.argmax(prob[sl]), patch.shape) + np.array(
            [s.start for s in sl])
        assert np.all(np.abs(peak - np.array(c)) <= 1.0)


def test_normalize():
    rng = np.random.default_rng(5)
    vol = rng.normal(3.0, 2.0, size=(40, 50, 60)).astype(np.float32)
    z = normalize(vol, {"method": "zscore"})
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    p = normalize(vol, {"method": "percentile", "p_low": 1.0, "p_high": 99.8})
    assert abs(np.percentile(p, 1.0)) < 0.02 and abs(np.percentile(p, 99.8) - 1) < 0.02
    inv = normalize(vol, {"method": "zscore"}, invert=True)
    np.testing.assert_allclose(inv, -z, atol=1e-3)
    assert vol.dtype == np.float32 and abs(vol.mean() - 3.0) < 0.05  # input untouched
    const = normalize(np.ones((4, 4, 4)), {"method": "zscore"})
    assert np.all(const == 0)


# ------------------------------------------------------------------------- preprocessing
def test_preprocess_smooths_before_normalising():
    rng = np.random.default_rng(9)
    vol = (rng.normal(5.0, 2.0, size=(30, 40, 50))).astype(np.float32)
    before = vol.copy()
    z = {"method": "zscore"}
    plain = preprocess(vol, {"normalization": z})
    np.testing.assert_allclose(plain, normalize(vol, z), atol=1e-6)
    smooth = preprocess(vol, {"normalization": z, "smooth_sigma": 1.0})
    # z-scored after smoothing (as the reference): unit std again, and the same as doing it by hand
    assert abs(smooth.std() - 1) < 0.05
    by_hand = normalize(ndimage.gaussian_filter(vol, 1.0, mode="nearest"), z)
    np.testing.assert_allclose(smooth, by_hand, atol=1e-5)
    # smoothing removes the white noise: neighbours become correlated
    corr = np.corrcoef(smooth[:, :, :-1].ravel(), smooth[:, :, 1:].ravel())[0, 1]
    assert corr > 0.5 and abs(np.corrcoef(plain[:, :, :-1].ravel(), plain[:, :, 1:].ravel())[0, 1]) < 0.1
    inv = preprocess(vol, {"normalization": z, "smooth_sigma": 1.0, "invert": True})
    np.testing.assert_allclose(inv, -smooth, atol=1e-5)
    np.testing.assert_array_equal(vol, before)  # input untouched
    with pytest.raises(ValueError, match="normalization"):
        preprocess(vol, {"smooth_sigma": 1.0})


def _net(x):
    """What the pass-through U-Net computes from its (preprocessed) input."""
    return 1.0 / (1.0 + np.exp(-(10.0 * np.maximum(x, 0.0) - 5.0)))


def test_predict_applies_card_smoothing_on_the_model_grid():
    """prob = net(preprocess(resample(tomo))), resampled back, for a pointwise net."""
    rng = np.random.default_rng(10)
    tomo = ndimage.gaussian_filter(rng.normal(size=(24, 40, 36)), 0.7).astype(np.float32)
    tomo += rng.normal(0, 0.3, tomo.shape).astype(np.float32)
    before = tomo.copy()
    model = _passthrough_model(2.0)  # model grid: 2 nm; the tomogram has 1 nm voxels
    model.card = model.card.with_preprocessing(smooth_sigma=1.0)
    prob = predict_probability(tomo, 1.0, model)
    np.testing.assert_array_equal(tomo, before)
    model_shape = (12, 20, 18)
    x = preprocess(resample(tomo, model_shape), model.card.preprocessing)
    expected = np.clip(resample(_net(x).astype(np.float32), tomo.shape,
                                anti_alias=False), 0, 1)
    np.testing.assert_allclose(prob, expected, atol=2e-5)
    # sigma is in voxels of the model grid: smoothing on the input grid gives another map
    wrong = preprocess(resample(ndimage.gaussian_filter(tomo, 1.0, mode="nearest"), model_shape),
                       {**model.card.preprocessing, "smooth_sigma": 0.0})
    assert np.abs(_net(wrong) - _net(x)).max() > 0.05
    # a per-call override replaces the card's value, and leaves the model unchanged
    raw = predict_probability(tomo, 1.0, model, preprocessing={"smooth_sigma": 0})
    x0 = preprocess(resample(tomo, model_shape), {**model.card.preprocessing, "smooth_sigma": 0})
    np.testing.assert_allclose(raw, np.clip(resample(_net(x0).astype(np.float32),
                                                     tomo.shape, anti_alias=False), 0, 1),
                               atol=2e-5)
    assert np.abs(raw - prob).max() > 0.05 and model.card.smooth_sigma == 1.0
    z = predict_probability(tomo, 1.0, model, preprocessing={"normalization": {"method": "zscore"},
                                                              "invert": True})
    xz = preprocess(resample(tomo, model_shape), {"smooth_sigma": 1.0, "invert": True,
                                                  "normalization": {"method": "zscore"}})
    np.testing.assert_allclose(z, np.clip(resample(_net(xz).astype(np.float32),
                                                   tomo.shape, anti_alias=False), 0, 1), atol=2e-5)


def test_preprocessing_override_errors(shallow_model):
    tomo = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sigma'\]; allowed: "
                                         r"\['smooth_sigma', 'normalization', 'invert'\]"):
        predict_probability(tomo, 1.0, shallow_model, preprocessing={"sigma": 1})
    with pytest.raises(ValueError, match="smooth_sigma"):
        predict_probability(tomo, 1.0, shallow_model, preprocessing={"smooth_sigma": -1})
    with pytest.raises(TypeError, match="preprocessing must be a dict"):
        predict_probability(tomo, 1.0, shallow_model, preprocessing=1.0)


# ------------------------------------------------------------------------- TTA, cancel
def test_tta(random_model):
    rng = np.random.default_rng(6)
    tomo = rng.normal(size=(20, 28, 24)).astype(np.float32)
    plain = predict_probability(tomo, 1.0, random_model)
    calls = []
    aug = predict_probability(tomo, 1.0, random_model, tta=True, batch_size=4,
                              progress=lambda *a: calls.append(a))
    assert aug.shape == tomo.shape and aug.dtype == np.float32
    assert calls[-1] == ("predict", 2, 2)  # 8 flips in batches of 4
    assert not np.allclose(aug, plain)  # a random net is not flip-equivariant
    # a flip-equivariant (pointwise) net gives the same map with and without TTA
    pw = _passthrough_model(1.0)
    np.testing.assert_allclose(predict_probability(tomo, 1.0, pw, tta=True),
                               predict_probability(tomo, 1.0, pw), atol=1e-5)


def test_cancel_stops_promptly(shallow_model):
    tomo = np.random.default_rng(7).normal(size=(32, 80, 80)).astype(np.float32)
    calls = []

    def progress(stage, done, total):
        calls.append((stage, done, total))
        if done >= 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        predict_probability(tomo, 1.0, shallow_model, tile_shape=(32, 32, 32), batch_size=1,
                            progress=progress)
    assert calls[-1][1] == 1 and calls[-1][2] > 5  # stopped after the first of many batches


# ------------------------------------------------------------------------- errors
def test_bad_inputs(random_model):
    good = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="3-D"):
        predict_probability(np.zeros((8, 8)), 1.0, random_model)
    with pytest.raises(ValueError, match="3-D"):
        predict_probability(np.zeros((2, 8, 8, 8)), 1.0, random_model)
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    nan[4, 4, 4] = np.nan
    nan[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="2 NaN and 1 infinite"):
        predict_probability(nan, 1.0, random_model)
    for vs in (0, -1.0, np.nan, np.inf, "abc", None):  # the one validator's own messages
        with pytest.raises((TypeError, ValueError)) as expected:
            check_voxel_size(vs)
        with pytest.raises(type(expected.value)) as got:
            predict_probability(good, vs, random_model)
        assert str(got.value) == str(expected.value) and "voxel_size" in str(got.value)
    with pytest.raises(TypeError, match="real numbers"):
        predict_probability(good.astype(np.complex64), 1.0, random_model)
    with pytest.raises(ValueError, match="empty"):
        predict_probability(np.zeros((0, 8, 8)), 1.0, random_model)
    with pytest.raises(ValueError, match="too small for halo"):
        predict_probability(np.zeros((64, 64, 64)), 1.0, random_model, tile_shape=(16, 16, 16))
    with pytest.raises(ValueError, match="batch_size"):
        predict_probability(good, 1.0, random_model, batch_size=0)


def test_model_by_path_and_bad_model(tmp_path, shallow_model):
    w = shallow_model.save(tmp_path / "shallow")
    tomo = np.random.default_rng(8).normal(size=(12, 20, 16)).astype(np.float32)
    a = predict_probability(tomo, 1.0, shallow_model)
    b = predict_probability(tomo, 1.0, str(w))
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(TypeError, match="UNetModel"):
        predict_probability(tomo, 1.0, 42)
    with pytest.raises(FileNotFoundError):
        predict_probability(tomo, 1.0, tmp_path / "missing.weights.h5")


def test_model_path_uses_the_shared_cache(tmp_path, shallow_model):
    """A path goes through cryoves.model.get_model: edits of the card on disk take effect."""
    import json
    import os

    import cryoves.predict as predict

    assert not hasattr(predict, "_MODEL_CACHE")  # one cache: cryoves.model.get_model
    w = shallow_model.save(tmp_path / "cache")
    tomo = np.random.default_rng(11).normal(size=(12, 20, 16)).astype(np.float32)
    a = predict_probability(tomo, 1.0, w)
    cached = get_model(w)
    card = json.loads((tmp_path / "cache.json").read_text())
    card["smooth_sigma"] = 1.0
    (tmp_path / "cache.json").write_text(json.dumps(card))
    st = (tmp_path / "cache.json").stat()
    os.utime(tmp_path / "cache.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    b = predict_probability(tomo, 1.0, w)
    assert get_model(w) is not cached and get_model(w).card.smooth_sigma == 1.0
    np.testing.assert_allclose(
        b, predict_probability(tomo, 1.0, shallow_model, preprocessing={"smooth_sigma": 1.0}),
        atol=1e-6)
    assert np.abs(a - b).max() > 1e-3


def test_scale_shrinks_the_view_and_min_region_radius_keeps_large_regions(random_model):
    from cryoves.predict import large_regions

    rng = np.random.default_rng(5)
    tomo = rng.normal(size=(48, 72, 80)).astype(np.float32)
    vs = random_model.card.voxel_size_nm
    # a pass at scale s is a pass at scale 1 of a tomogram with voxels s times as large
    shrunk = predict_probability(tomo, vs, random_model, scale=0.75)
    np.testing.assert_array_equal(shrunk, predict_probability(tomo, vs * 0.75, random_model))
    assert not np.allclose(shrunk, predict_probability(tomo, vs, random_model))
    # regions are selected on the model grid (vs / 0.75 nm per voxel), then resampled back
    kept = predict_probability(tomo, vs, random_model, scale=0.75, min_region_radius_nm=2 * vs)
    raw = predict_probability(tomo, vs, random_model, scale=0.75)
    assert kept.shape == tomo.shape and kept.any()
    assert np.all(kept <= raw + 1e-6)
    none = predict_probability(tomo, vs, random_model, scale=0.75, min_region_radius_nm=1000.0)
    assert not none.any()


def test_large_regions_keeps_regions_by_volume_with_a_margin():
    from cryoves.predict import large_regions

    p = np.zeros((40, 40, 40), np.float32)
    zz, yy, xx = np.ogrid[:40, :40, :40]
    big = (zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 6 ** 2
    small = (zz - 30) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 <= 3 ** 2
    p[big] = 0.9
    p[small] = 0.9
    p += 0.2 * (~(big | small))  # low background everywhere
    out = large_regions(p, 2.0, min_radius_nm=10.0, margin_nm=4.0)  # 5 and 2 voxels
    assert np.all(out[big] == p[big]) and not out[small].any()
    assert out[12, 12, 12 + 7] == p[12, 12, 12 + 7]  # within the margin
    assert out[12, 12, 12 + 10] == 0  # beyond it
    assert not large_regions(np.zeros((8, 8, 8), np.float32), 1.0, 1.0).any()


@pytest.mark.parametrize("bad", [dict(scale=0.1), dict(scale=float("nan")), dict(scale="x"), dict(scale=5.0),
                                 dict(min_region_radius_nm=0.0), dict(min_region_radius_nm=-3.0)])
def test_scale_and_region_radius_reject_bad_values(random_model, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        predict_probability(np.zeros((16, 16, 16), np.float32), 1.0, random_model, **bad)


@pytest.mark.parametrize("shape, pre", [((37, 70, 61), {"smooth_sigma": 0.5}),
                                        ((40, 64, 72), {"smooth_sigma": 1.0, "invert": True}),
                                        ((1, 90, 93), {"smooth_sigma": 0.5}),
                                        ((33, 50, 47), {"smooth_sigma": 0})])
def test_streamed_preprocessing_gives_identical_maps(shape, pre, shallow_model, monkeypatch, tmp_path):
    """Large volumes are preprocessed tile by tile from a memory map: bit for bit the same map."""
    import cryoves.predict as P

    rng = np.random.default_rng(5)
    path = tmp_path / "t.raw"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
    mm[:] = rng.normal(size=shape) * 3 + 7
    mm.flush()
    tomo = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    tiles = dict(tile_shape=(32 if shape[0] > 30 else 1, 36, 36), halo=6, blend=4)
    whole = predict_probability(tomo, 1.0, shallow_model, preprocessing=pre, **tiles)
    monkeypatch.setattr(P, "STREAM_VOXELS", 1)  # every volume streamed
    monkeypatch.setattr(P, "_SLAB_VOXELS", 2000)  # statistics gathered over many slabs
    made = []
    real = P._StreamedTiles.__call__
    monkeypatch.setattr(P._StreamedTiles, "__call__", lambda self, *a: made.append(a) or real(self, *a))
    streamed = predict_probability(tomo, 1.0, shallow_model, preprocessing=pre, **tiles)
    assert len(made) > 1
    np.testing.assert_array_equal(streamed, whole)



def test_streamed_volumes_use_the_smaller_tile_budget(shallow_model, monkeypatch):
    import cryoves.predict as P

    budgets = []
    real = P.plan_tiles
    monkeypatch.setattr(P, "plan_tiles", lambda *a, **k: budgets.append(k["max_tile_voxels"]) or real(*a, **k))
    tomo = np.random.default_rng(0).normal(size=(40, 64, 64)).astype(np.float32)
    whole = predict_probability(tomo, 1.0, shallow_model, max_tile_voxels=10 ** 7)
    monkeypatch.setattr(P, "STREAM_VOXELS", 1)
    monkeypatch.setattr(P, "STREAM_MAX_TILE_VOXELS", 40 * 64 * 40)
    streamed = predict_probability(tomo, 1.0, shallow_model, max_tile_voxels=10 ** 7)
    assert budgets == [10 ** 7, 40 * 64 * 40]
    np.testing.assert_allclose(streamed, whole, atol=1e-4)  # other tiles: equal to float rounding
