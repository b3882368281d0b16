"""Tests for cryoves.refine (radial profile, sphere refinement, click-to-fit)."""

import time

import numpy as np
import pytest

from cryoves import Cancelled, VesicleTable, render_labels
from cryoves.refine import (detection_score, fit_sphere_at, initial_spheres_from_labels, intensity_normalization,
                            radial_profile, refine_spheres)

from cryoves.simulate import simulate_tomogram

from _synthetic import draw_vesicles, random_vesicles

VOXEL = 2.0
SHAPE = (64, 128, 128)


@pytest.fixture(scope="module")
def scene():
    centers, radii = random_vesicles(SHAPE, 30, r_range=(7, 11), seed=0)
    tomo = draw_vesicles(SHAPE, centers, radii, thickness=2.0, noise=1.0, seed=5)
    return tomo, centers, radii


def _perturbed(centers, radii, seed=1):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(centers.shape)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    c0 = centers + d * rng.uniform(2, 4, len(centers))[:, None]
    r0 = radii * rng.choice([0.8, 1.2], len(radii))
    return c0, r0


def test_radial_profile_of_distance_field():
    c = np.array([10.3, 11.7, 9.2])
    zz, yy, xx = np.indices((22, 24, 20), dtype=np.float64)
    vol = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    d, p, n = radial_profile(vol, c, 8.0, return_counts=True)
    np.testing.assert_allclose(p, d, atol=1e-5)
    assert np.all(np.diff(d) > 0) and d[-1] < 8.0 and n.sum() > 1000
    d1, p1 = radial_profile(vol, c, 8.0, bin_width=1.0)
    assert len(d1) == 8


def test_radial_profile_finds_membrane(scene):
    tomo, centers, radii = scene
    d, p = radial_profile(tomo, centers[0], radii[0] + 5)
    sel = d > 3  # the innermost bins hold only a few voxels
    d_m = d[sel][np.argmin(p[sel])]
    assert abs(d_m - (radii[0] - 1.0)) <= 0.75


def test_refine_recovers_perturbed_batch(scene):
    tomo, centers, radii = scene
    c0, r0 = _perturbed(centers, radii)
    start = VesicleTable.from_arrays(c0, r0, voxel_size=VOXEL)
    before = tomo.copy()
    out = refine_spheres(tomo, start, VOXEL)
    np.testing.assert_array_equal(tomo, before)
    assert len(out) == len(centers)
    assert np.all(out["status"] == "accepted") and np.all(out["stage"] == "refine")
    cerr = np.linalg.norm(out.centers - centers, axis=1)
    rerr = out.radii - radii
    print(f"\ncentre error mean {cerr.mean():.2f} max {cerr.max():.2f} vox; "
          f"radius error mean {rerr.mean():+.2f} max |{np.abs(rerr).max():.2f}| vox")
    assert cerr.max() < 1.0
    assert np.abs(rerr).max() < 1.0
    assert cerr.mean() < 0.5 and abs(rerr.mean()) < 0.5
    # features: thickness near the 2-voxel band (blurred), density negative (dark membrane)
    assert np.all((out["thickness"] > 1.0) & (out["thickness"] < 4.0))
    assert np.all(out["density"] < 0)
    np.testing.assert_array_equal(out.ids, start.ids)


def test_refine_paper_loop_without_capture_drifts_more(scene):
    """The capture step is what makes large starting errors converge (see refine module docs)."""
    tomo, centers, radii = scene
    c0, r0 = _perturbed(centers, radii)
    start = VesicleTable.from_arrays(c0, r0, voxel_size=VOXEL)
    plain = refine_spheres(tomo, start, VOXEL, capture=False)
    cerr = np.linalg.norm(plain.centers - centers, axis=1)
    assert cerr.max() > 1.0


def test_second_derivative_radius_is_biased_outwards(scene):
    tomo, centers, radii = scene
    start = VesicleTable.from_arrays(centers[:10], radii[:10], voxel_size=VOXEL)
    a = refine_spheres(tomo, start, VOXEL, radius_method="max_slope")
    b = refine_spheres(tomo, start, VOXEL, radius_method="second_derivative")
    diff = b.radii - a.radii
    assert 0.5 < diff.mean() < 2.0
    assert np.all(b["thickness"] > a["thickness"])


def _simulated_radius_error(voxel_size, seed=3, field_nm=(100.0, 260.0, 260.0), bilayer_nm=4.5,
                            radius_method="membrane_centre", min_converged=0.9, **overrides):
    """δd and mean signed relative radius error of refine_spheres on one small simulated tomogram,
    started from the true spheres moved by 1.5 voxels with radii 0.85-1.15x, over the vesicles whose
    centre converged (within 2 voxels: at least ``min_converged`` of them)."""
    from cryoves.simulate import SimulationParams
    shape = tuple(int(round(n / voxel_size)) for n in field_nm)
    sim = simulate_tomogram(shape, params=SimulationParams(voxel_size=voxel_size, seed=seed, **overrides))
    truth = sim.table
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((len(truth), 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    start = VesicleTable.from_arrays(truth.centers + 1.5 * d, truth.radii * rng.uniform(0.85, 1.15, len(truth)),
                                     voxel_size=voxel_size)
    out = refine_spheres(sim.tomogram, start, voxel_size, radius_method=radius_method, bilayer_nm=bilayer_nm)
    ok = (out["status"] == "accepted") & (np.linalg.norm(out.centers - truth.centers, axis=1) < 2.0)
    assert ok.sum() >= min_converged * len(truth) >= 9
    rf, rt = out.radii[ok], truth.radii[ok]
    return float(np.mean(1 - np.minimum(rf, rt) / np.maximum(rf, rt))), float(np.mean(rf / rt - 1))


@pytest.mark.parametrize("voxel_size, overrides", [
    (2.2, {}),
    (2.2, dict(membrane_blur_nm=1.5)),
    (2.2, dict(leaflet_width=0.18, headgroup_separation=0.45)),
    (2.2, dict(headgroup_separation=0.75, defocus_um=-3.0)),
    (1.2, dict(defocus_um=-4.0, ctf_correction=True)),   # two leaflets resolved: +5.5 % before
])
def test_default_radius_rule_holds_across_membrane_profiles(voxel_size, overrides):
    """Issue 12, item 4: δd <= 0.02 when the bilayer's leaflets, blur, the defocus and the voxel size
    vary (benchmarks/radius_rule.py measures more profiles)."""
    dd, bias = _simulated_radius_error(voxel_size, **overrides)
    assert dd <= 0.02 and abs(bias) <= 0.015, (dd, bias)


def test_radius_rule_takes_two_resolved_dark_lines_as_one_membrane():
    """The sharpest leaflets furthest apart at 1.6 nm: the tomogram shows two dark lines about 5 nm
    apart with a light one between them. The minimum of the smoothed profile took either line
    (this tomogram: δd 0.038, bias +2.4 %; seeds 1-5: 0.034-0.047); the centroid of the dark mass
    takes their middle (0.013, -0.1 %; seeds 1-5: 0.008-0.015). Two of its 13 vesicles do not
    centre within 2 voxels, with either rule."""
    dd, bias = _simulated_radius_error(1.6, min_converged=0.8, leaflet_width=0.06, headgroup_separation=0.75)
    assert dd <= 0.02 and abs(bias) <= 0.015, (dd, bias)


def test_max_slope_radius_grows_with_the_membrane_blur():
    """The max-slope rule (not the default) puts the edge where the blurred membrane looks: too far
    out, more so the more it is blurred (measured +2.3 % sharp, +3.6 % with 1.5 nm of blur)."""
    sharp = _simulated_radius_error(2.2, radius_method="max_slope")[1]
    blurred = _simulated_radius_error(2.2, radius_method="max_slope", membrane_blur_nm=1.5)[1]
    assert sharp > 0.01 and blurred - sharp > 0.006, (sharp, blurred)


def test_membrane_centre_rule_follows_the_bilayer_thickness():
    """A 6 nm bilayer: the radius is right with bilayer_nm=6 and too small with the default 4.5 nm
    (measured -0.3 % and -1.7 %)."""
    dd6, bias6 = _simulated_radius_error(2.2, membrane_thickness_nm=6.0, bilayer_nm=6.0)
    dd45, bias45 = _simulated_radius_error(2.2, membrane_thickness_nm=6.0)
    assert dd6 <= 0.02 and abs(bias6) <= 0.015, (dd6, bias6)
    assert -0.05 < bias45 - bias6 < -0.01, (bias45, bias6)


def test_refine_from_labels_and_scale_invariance(scene):
    tomo, centers, radii = scene
    truth = VesicleTable.from_arrays(centers, radii * 0.85, voxel_size=VOXEL)
    labels = render_labels(truth, SHAPE)
    init = initial_spheres_from_labels(labels, VOXEL)
    assert len(init) == len(centers)
    out = refine_spheres(tomo, labels, VOXEL)
    order = np.argsort(out.ids)
    cerr = np.linalg.norm(out.centers[order] - centers, axis=1)
    assert cerr.max() < 1.0
    assert np.abs(out.radii[order] - radii).max() < 1.0
    # affine intensity change: same geometry, same normalised density
    out2 = refine_spheres(tomo * 5.0 - 300.0, labels, VOXEL)
    np.testing.assert_allclose(out2.centers, out.centers, atol=1e-3)
    np.testing.assert_allclose(out2["density"], out["density"], atol=1e-3)


def test_refine_removes_when_no_membrane():
    tomo = np.zeros((40, 40, 40), np.float32)
    start = VesicleTable.from_arrays([[20, 20, 20]], [8.0], voxel_size=VOXEL)
    out = refine_spheres(tomo, start, VOXEL)
    assert out["status"][0] == "removed" and out["note"][0]


def test_refine_passes_removed_rows_through(scene):
    tomo, centers, radii = scene
    t = VesicleTable.from_arrays(centers[:3], radii[:3], voxel_size=VOXEL, status=["accepted", "removed", "accepted"],
                                 note=["", "by user", ""], stage="editor")
    out = refine_spheres(tomo, t, VOXEL)
    assert out["status"][1] == "removed" and out["note"][1] == "by user" and out["stage"][1] == "editor"
    assert out.radii[1] == radii[1]
    assert out["stage"][0] == "refine"


def test_refine_progress_and_cancel(scene):
    tomo, centers, radii = scene
    start = VesicleTable.from_arrays(centers[:20], radii[:20], voxel_size=VOXEL)
    calls = []
    refine_spheres(tomo, start, VOXEL, progress=lambda *a: calls.append(a))
    assert calls[0] == ("refine", 0, 20) and calls[-1] == ("refine", 20, 20)

    def cancel(stage, done, total):
        if done > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        refine_spheres(tomo, start, VOXEL, progress=cancel)


def test_refine_validation(scene):
    tomo, centers, radii = scene
    with pytest.raises(ValueError, match="voxel_size"):
        refine_spheres(tomo, VesicleTable.from_arrays(centers[:1], radii[:1]), -1)
    with pytest.raises(ValueError, match="voxel size"):
        refine_spheres(tomo, VesicleTable.from_arrays(centers[:1], radii[:1], voxel_size=1.0), VOXEL)
    with pytest.raises(ValueError, match="shape"):
        refine_spheres(tomo, np.zeros((3, 3, 3), int), VOXEL)


def test_fit_sphere_at_near_centre(scene):
    tomo, centers, radii = scene
    norm = intensity_normalization(tomo)
    rng = np.random.default_rng(7)
    times = []
    for k in range(10):
        d = rng.standard_normal(3)
        click = centers[k] + d / np.linalg.norm(d) * rng.uniform(0, 3)
        t0 = time.perf_counter()
        res = fit_sphere_at(tomo, click, VOXEL, normalization=norm, vesicle_id=40 + k)
        times.append(time.perf_counter() - t0)
        assert len(res) == 1, k
        assert res.ids[0] == 40 + k and res["stage"][0] == "editor" and res.voxel_size == VOXEL
        assert np.linalg.norm(res.centers[0] - centers[k]) < 1.0
        assert abs(res.radii[0] - radii[k]) < 1.0
    # the editor needs < 0.2 s per click (median; the test machine is shared)
    assert np.median(times) < 0.2, times
    # without a precomputed normalisation it still works
    assert len(fit_sphere_at(tomo, centers[0], VOXEL)) == 1


def test_fit_sphere_at_empty_cytosol_returns_empty(scene):
    tomo, centers, radii = scene
    rng = np.random.default_rng(11)
    norm = intensity_normalization(tomo)
    n_found = 0
    n = 0
    while n < 12:
        q = rng.uniform([10, 10, 10], np.array(SHAPE) - 10)
        if np.min(np.linalg.norm(centers - q, axis=1) - radii) < 6:
            continue
        n += 1
        n_found += len(fit_sphere_at(tomo, q, VOXEL, normalization=norm))
    assert n_found == 0
    # pure noise, and outside the volume
    noise = np.random.default_rng(0).standard_normal((48, 48, 48)).astype(np.float32)
    for q in [(24, 24, 24), (0, 0, 0), (47, 47, 47), (0, 24, 24), (5, 5, 5)]:
        assert len(fit_sphere_at(noise, q, VOXEL)) == 0, q
    assert len(fit_sphere_at(tomo, (-5, 10, 10), VOXEL)) == 0


def test_fit_and_refine_vesicle_cut_by_the_border():
    c = np.array([[6.3, 40.2, 40.7]])
    tomo = draw_vesicles((40, 80, 80), c, [9.0], noise=1.0, seed=1)
    res = fit_sphere_at(tomo, c[0] + 1, VOXEL)
    assert len(res) == 1 and np.linalg.norm(res.centers[0] - c[0]) < 1 and abs(res.radii[0] - 9) < 1
    out = refine_spheres(tomo, VesicleTable.from_arrays(c + 1.5, [10.0], voxel_size=VOXEL), VOXEL)
    assert np.linalg.norm(out.centers[0] - c[0]) < 1 and abs(out.radii[0] - 9) < 1


def test_detection_score_separates(scene):
    tomo, centers, radii = scene
    norm = intensity_normalization(tomo)
    s_ves = [detection_score(tomo, centers[k], radii[k], 2.0, normalization=norm) for k in range(5)]
    far = np.array([5.0, 5.0, 5.0])
    s_bg = detection_score(tomo, far + [10, 50, 60], 9.0, 2.0, normalization=norm)
    assert min(s_ves) > 5.0
    assert s_bg < min(s_ves)


# ---------------------------------------------------------------------------------------------
# on the full simulator (CTF, tilt series, weighted back-projection, distractors)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    return simulate_tomogram((64, 128, 128), voxel_size=2.2, seed=4)


def test_refine_on_simulated_tomogram(sim):
    T = sim.table
    C, R = T.centers, T.radii
    shape = np.array(sim.tomogram.shape)
    inside = np.all((C > R[:, None] + 2) & (C < shape - R[:, None] - 2), axis=1)
    assert inside.sum() >= 8
    c0, r0 = _perturbed(C, R, seed=9)
    out = refine_spheres(sim.tomogram, VesicleTable.from_arrays(c0, r0, voxel_size=sim.voxel_size), sim.voxel_size)
    cerr = np.linalg.norm(out.centers - C, axis=1)[inside]
    rerr = (out.radii - R)[inside]
    terr = (out["thickness"] - T["thickness"])[inside]
    print(f"\nsimulated: {inside.sum()} vesicles, centre error mean {cerr.mean():.2f} max {cerr.max():.2f}, "
          f"radius error mean {rerr.mean():+.2f} max |{np.abs(rerr).max():.2f}|, "
          f"thickness error mean {terr.mean():+.2f} voxels")
    assert cerr.max() < 1.0 and np.abs(rerr).max() < 1.0
    assert abs(np.median(terr)) < 1.0
    # the editor: clicks near the centres
    norm = intensity_normalization(sim.tomogram)
    rng = np.random.default_rng(1)
    for k in np.flatnonzero(inside)[:5]:
        res = fit_sphere_at(sim.tomogram, C[k] + rng.uniform(-2, 2, 3), sim.voxel_size, normalization=norm)
        assert len(res) == 1
        assert np.linalg.norm(res.centers[0] - C[k]) < 1.0 and abs(res.radii[0] - R[k]) < 1.0


def test_large_vesicles_in_voxels_use_the_binned_path():
    """At ~1 nm voxels vesicles are 15-25 voxels in radius: the coarse steps run binned."""
    shape = (72, 112, 112)
    centers = np.array([[36.2, 30.4, 30.9], [35.7, 80.1, 32.3], [36.5, 56.6, 80.2]])
    radii = np.array([17.0, 21.5, 19.0])
    tomo = draw_vesicles(shape, centers, radii, thickness=4.5, blur=1.0, noise=1.0, seed=2)
    c0, r0 = _perturbed(centers, radii, seed=4)
    out = refine_spheres(tomo, VesicleTable.from_arrays(c0, r0, voxel_size=1.0), 1.0)
    assert np.linalg.norm(out.centers - centers, axis=1).max() < 1.0
    assert np.abs(out.radii - radii).max() < 1.0
    norm = intensity_normalization(tomo)
    res = fit_sphere_at(tomo, centers[1] + [2, -1, 1], 1.0, normalization=norm)
    assert len(res) == 1 and np.linalg.norm(res.centers[0] - centers[1]) < 1.0
    assert detection_score(tomo, centers[2], radii[2], 4.5, normalization=norm) > 5.0
    assert len(fit_sphere_at(tomo, (10, 56, 56), 1.0, normalization=norm)) == 0


def test_capture_cache_reuses_one_search_per_starting_sphere(scene, monkeypatch):
    """Re-fits of one start with growing boxes (the outlier stage) share one capture search."""
    import cryoves.refine as R

    tomo, centers, radii = scene
    c0, r0 = _perturbed(centers[:3], radii[:3], seed=4)
    norm = intensity_normalization(tomo)
    calls = []
    real = R._capture
    monkeypatch.setattr(R, "_capture", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cache = {}
    for c, r in zip(c0, r0):
        for margin in (8.0, 9.0, 10.0):
            plain = R.fit_sphere(tomo, c, r, voxel_size=VOXEL, normalization=norm, box_margin_vox=margin)
            cached = R.fit_sphere(tomo, c, r, voxel_size=VOXEL, normalization=norm, box_margin_vox=margin,
                                  capture_cache=cache)
            assert plain.ok and cached.ok
            assert np.array_equal(plain.center, cached.center) and plain.radius == cached.radius
            assert (plain.thickness, plain.n_iter, plain.note) == (cached.thickness, cached.n_iter, cached.note)
    assert len(calls) == 9 + 3  # every plain fit searches; the cached ones once per start
    assert len(cache) == 3
    # a failed search is remembered too: the box outside the volume
    far = np.array([500.0, 500.0, 500.0])
    for _ in range(2):
        fit = R.fit_sphere(tomo, far, 8.0, voxel_size=VOXEL, normalization=norm, capture_cache=cache)
        assert not fit.ok and "outside" in fit.note
    assert len(calls) == 13
