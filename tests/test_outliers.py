"""Tests for cryoves.outliers (Mahalanobis p-values, outlier refit/removal, overlaps)."""

import numpy as np
import pytest
from scipy import stats

from cryoves import VesicleTable
from cryoves.outliers import filter_outliers, mahalanobis_pvalues, resolve_overlaps
from cryoves.refine import refine_spheres

from cryoves.simulate import simulate_tomogram

from _synthetic import draw_vesicles, random_vesicles

VOXEL = 2.0
SHAPE = (64, 128, 128)


def _feature_table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(20, 100, (n, 3))
    return VesicleTable.from_arrays(c, rng.normal(10, 1, n), voxel_size=VOXEL, thickness=rng.normal(2.5, 0.2, n),
                                    density=rng.normal(-0.6, 0.05, n), stage="refine")


def test_pvalues_match_chi2_with_three_dof():
    t = _feature_table()
    p = mahalanobis_pvalues(t)
    X = np.stack([t["thickness"], t["density"], t["radius"]], 1)
    mu = X.mean(0)
    S = np.cov(X, rowvar=False)
    d2 = np.einsum("ij,jk,ik->i", X - mu, np.linalg.inv(S), X - mu)
    np.testing.assert_allclose(p, stats.chi2.sf(d2, 3), rtol=1e-8)
    assert np.all((p >= 0) & (p <= 1))


def test_chi2_helpers_equal_scipy_stats_exactly():
    """The outlier stage avoids importing scipy.stats (slow) but must compute the same numbers."""
    from cryoves.outliers import _chi2_cdf, _chi2_ppf, _chi2_sf

    rng = np.random.default_rng(3)
    x = np.concatenate([[0.0, 1e-12, 0.5, 7.81, 50.0, 400.0], rng.exponential(4.0, 200)])
    q = np.concatenate([[0.5, 0.975, 1e-6, 1 - 1e-9], rng.uniform(0, 1, 50)])
    for dof in (1, 2, 3, 5):
        assert np.array_equal(_chi2_sf(x, dof), stats.chi2.sf(x, dof))
        assert np.array_equal(_chi2_cdf(x, dof), stats.chi2.cdf(x, dof))
        assert np.array_equal(_chi2_ppf(q, dof), stats.chi2.ppf(q, dof))
        assert _chi2_cdf(_chi2_ppf(0.6, dof), dof + 2) == stats.chi2.cdf(stats.chi2.ppf(0.6, dof), dof + 2)


def test_pvalues_few_vesicles_are_nan_and_singular_covariance_is_handled():
    t = _feature_table(3)
    assert np.all(np.isnan(mahalanobis_pvalues(t)))
    t = _feature_table(30)
    t["thickness"] = 2.5  # constant feature: singular covariance
    p = mahalanobis_pvalues(t)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    X = np.stack([t["density"], t["radius"]], 1)
    d2 = np.einsum("ij,jk,ik->i", X - X.mean(0), np.linalg.inv(np.cov(X, rowvar=False)), X - X.mean(0))
    np.testing.assert_allclose(p, stats.chi2.sf(d2, 2), rtol=1e-6)  # dof = rank = 2


def test_pvalues_removed_rows_do_not_count_but_get_a_value():
    t = _feature_table(30)
    t2 = t.copy()
    r = t2["radius"].copy()
    r[0] = 40.0
    t2["radius"] = r
    st = t2["status"].copy()
    st[0] = "removed"
    t2["status"] = st
    p = mahalanobis_pvalues(t2)
    np.testing.assert_allclose(p[1:], mahalanobis_pvalues(t.select(np.arange(1, 30))), rtol=1e-8)
    assert p[0] < 1e-6


def test_robust_option_unmasks_clustered_outliers():
    t = _feature_table(30, seed=2)
    r = t["radius"].copy()
    r[:3] = [16.0, 16.5, 17.0]  # three similar gross outliers inflate the plain covariance
    t["radius"] = r
    plain = mahalanobis_pvalues(t)
    robust = mahalanobis_pvalues(t, robust=True)
    assert np.all(robust[:3] < plain[:3])
    assert np.all(robust[:3] < 1e-3)


@pytest.fixture(scope="module")
def scene():
    centers, radii = random_vesicles(SHAPE, 26, r_range=(7.5, 10.5), min_gap=4, seed=2)
    # vesicle 0: a much larger "vesicle" (e.g. an endosome); vesicle 1: a much thicker membrane
    radii = radii.copy()
    radii[0] = 16.0
    thick = np.full(len(radii), 2.0)
    thick[1] = 4.5  # 9 nm: an atypical membrane that is still clearly one (detection score 10.8)
    centers[0] = [32, 64, 64]
    keep = np.ones(len(centers), bool)
    for i in range(1, len(centers)):
        if np.linalg.norm(centers[i] - centers[0]) < radii[i] + radii[0] + 4:
            keep[i] = False
    centers, radii, thick = centers[keep], radii[keep], thick[keep]
    tomo = draw_vesicles(SHAPE, centers, radii, thicknesses=thick, noise=0.8, seed=3)
    start = VesicleTable.from_arrays(centers, radii, voxel_size=VOXEL)
    refined = refine_spheres(tomo, start, VOXEL)
    return tomo, centers, radii, refined


def test_injected_outliers_get_low_p_and_are_removed(scene):
    tomo, centers, radii, refined = scene
    assert len(refined) >= 15 and np.all(refined["status"] == "accepted")
    p = mahalanobis_pvalues(refined)
    assert np.all((p >= 0) & (p <= 1))
    assert p[0] < 1e-3 and p[1] < 1e-3
    before = refined.copy()
    out = filter_outliers(tomo, refined, VOXEL, min_radius_nm=10.0, keep_score=None)  # the paper's rule
    assert out == out and refined == before  # input untouched
    assert out["status"][0] == "removed" and out["note"][0].startswith("outlier p=")
    assert out["status"][1] == "removed" and out["stage"][1] == "outliers"
    normal = np.arange(2, len(out))
    assert np.all(out["status"][normal] == "accepted")
    assert np.all(out["pvalue"][normal] >= 0.01)
    assert np.all(np.isfinite(out["pvalue"])) and np.all((out["pvalue"] >= 0) & (out["pvalue"] <= 1))
    # p-values of the kept vesicles are computed without the removed ones
    np.testing.assert_allclose(out["pvalue"][normal], mahalanobis_pvalues(out.select(normal)), rtol=1e-8)


def test_atypical_vesicle_with_a_clear_membrane_is_kept_but_not_a_too_large_one(scene):
    """Default: the thick-membraned vesicle of a vesicle's size is kept (and marked); the
    'endosome' (twice the radius) is still removed, as are both with the paper's rule."""
    tomo, centers, radii, refined = scene
    out = filter_outliers(tomo, refined, VOXEL, min_radius_nm=10.0)
    assert out["status"][0] == "removed" and out["note"][0].startswith("outlier p=")
    assert out["status"][1] == "accepted" and out["stage"][1] == "outliers"
    assert out["note"][1].startswith("atypical (p=") and "kept: clear membrane" in out["note"][1]
    assert np.all(out["status"][2:] == "accepted")


def test_keep_threshold_follows_the_tomograms_median_score(scene):
    """keep_score is lowered to keep_score_relative x the median membrane score: with a keep
    threshold above the atypical vesicle's score (10.8) it is removed, unless the relative
    threshold is below its score."""
    from cryoves.refine import detection_score, intensity_normalization

    tomo, centers, radii, refined = scene
    norm = intensity_normalization(tomo)
    scores = [detection_score(tomo, refined.centers[i], refined.radii[i], refined["thickness"][i],
                              normalization=norm) for i in range(2, len(refined))]
    med = float(np.median(scores))
    assert med > 9.0  # so that 9 / med is a fraction
    strict = filter_outliers(tomo, refined, VOXEL, min_radius_nm=10.0, keep_score=25.0, keep_score_relative=None)
    assert strict["status"][1] == "removed"
    rel = filter_outliers(tomo, refined, VOXEL, min_radius_nm=10.0, keep_score=25.0,
                          keep_score_relative=9.0 / med)
    assert rel["status"][1] == "accepted" and "kept: clear membrane" in rel["note"][1]
    assert rel["status"][0] == "removed"
    with pytest.raises(ValueError, match="keep_score_relative"):
        filter_outliers(tomo, refined, VOXEL, keep_score_relative=2.0)


def test_paper_threshold_removes_many_real_vesicles(scene):
    """Documented reason for the 0.01 default: p < 0.3 flags ~30 % of a normal population."""
    tomo, centers, radii, refined = scene
    out = filter_outliers(tomo, refined, VOXEL, p_threshold=0.3, min_radius_nm=10.0, max_iter=2,
                          keep_score=None)  # the p-value rule alone
    n_normal_removed = int(np.sum(out["status"][2:] == "removed"))
    assert n_normal_removed >= 2


def test_min_radius_removal(scene):
    tomo, centers, radii, refined = scene
    out = filter_outliers(tomo, refined, VOXEL, min_radius_nm=17.0, remove_overlaps=False)
    small = refined.radii * VOXEL <= 17.0
    assert np.all(out["status"][small] == "removed")
    assert all("<= 17 nm" in n for n in out["note"][small])


def test_refit_can_rescue_a_bad_fit(scene):
    tomo, centers, radii, refined = scene
    t = refined.copy()
    z = t["z"].copy()
    r = t["radius"].copy()
    th = t["thickness"].copy()
    # a wrong fit: centre 3 voxels off, radius and thickness wrong
    z[5] += 3.0
    r[5] *= 1.3
    th[5] *= 2.5
    t["z"], t["radius"], t["thickness"] = z, r, th
    assert mahalanobis_pvalues(t)[5] < 0.01
    out = filter_outliers(tomo, t, VOXEL, min_radius_nm=10.0)
    assert out["status"][5] == "accepted" and out["stage"][5] == "outliers"
    assert np.linalg.norm(out.centers[5] - centers[5]) < 1.0
    assert abs(out.radii[5] - radii[5]) < 1.0
    assert out["pvalue"][5] >= 0.01 and out["note"][5].startswith("re-fitted")


def test_resolve_overlaps_leaves_no_overlap():
    rng = np.random.default_rng(5)
    c = rng.uniform(0, 60, (60, 3))
    r = rng.uniform(5, 9, 60)
    t = VesicleTable.from_arrays(c, r, voxel_size=VOXEL, pvalue=rng.random(60))
    out = resolve_overlaps(t)
    acc = out.accepted()
    d = np.linalg.norm(acc.centers[:, None] - acc.centers[None], axis=2)
    rr = acc.radii[:, None] + acc.radii[None]
    np.fill_diagonal(d, np.inf)
    assert np.all(d >= rr * (1 - 1e-6))
    assert np.all(out.radii <= t.radii + 1e-12)
    removed = out["status"] == "removed"
    assert all(n.startswith("overlaps vesicle") for n in out["note"][removed])
    # touching spheres: shrunk so they just touch
    t2 = VesicleTable.from_arrays([[0, 0, 0], [0, 0, 15]], [8, 9], voxel_size=VOXEL)
    o2 = resolve_overlaps(t2)
    assert np.all(o2["status"] == "accepted")
    assert o2.radii.sum() == pytest.approx(15.0, rel=1e-6)
    np.testing.assert_allclose(o2.radii / t2.radii, 15.0 / 17.0, rtol=1e-6)
    assert list(o2["note"]) == ["radius shrunk to resolve an overlap"] * 2
    # a centre inside the other sphere: the lower p-value goes
    t3 = VesicleTable.from_arrays([[0, 0, 0], [0, 0, 3]], [8, 8], voxel_size=VOXEL, pvalue=[0.9, 0.2])
    o3 = resolve_overlaps(t3)
    assert list(o3["status"]) == ["accepted", "removed"] and o3["note"][1] == "overlaps vesicle 1"


def test_sub_voxel_overlap_shrinks_without_a_note():
    """Touching vesicles overlapping by a fraction of a voxel are shrunk silently (no alarm note)."""
    t = VesicleTable.from_arrays([[0, 0, 0], [0, 0, 16.4]], [8, 9], voxel_size=VOXEL)
    o = resolve_overlaps(t)
    assert o.radii.sum() == pytest.approx(16.4, rel=1e-6)
    assert list(o["note"]) == ["", ""]
    o = resolve_overlaps(t, note_min_vox=0.1)
    assert list(o["note"]) == ["radius shrunk to resolve an overlap"] * 2


def test_filter_outliers_few_vesicles_never_removes(scene):
    tomo, centers, radii, refined = scene
    small = refined.select([2, 3, 4])
    out = filter_outliers(tomo, small, VOXEL, min_radius_nm=10.0)
    assert np.all(out["status"] == "accepted") and np.all(np.isnan(out["pvalue"]))


def test_filter_outliers_validation(scene):
    tomo, centers, radii, refined = scene
    with pytest.raises(ValueError, match="p_threshold"):
        filter_outliers(tomo, refined, VOXEL, p_threshold=2)
    with pytest.raises(TypeError):
        filter_outliers(tomo, {"z": [1]}, VOXEL)
    with pytest.raises(ValueError, match="feature"):
        mahalanobis_pvalues(refined, features=("note",))


def test_outliers_on_simulated_tomogram():
    sim = simulate_tomogram((64, 128, 128), voxel_size=2.2, seed=4)
    T = sim.table
    C, R = T.centers, T.radii
    rng = np.random.default_rng(0)
    # two bogus starting spheres in cytosol, away from every vesicle
    fakes = []
    while len(fakes) < 2:
        q = rng.uniform([12, 20, 20], np.array(sim.tomogram.shape) - [12, 20, 20])
        if np.min(np.linalg.norm(C - q, axis=1) - R) > 8 and all(np.linalg.norm(q - f) > 20 for f in fakes):
            fakes.append(q)
    start = VesicleTable.from_arrays(np.vstack([C, fakes]), np.r_[R, [9.0, 9.0]], voxel_size=sim.voxel_size)
    refined = refine_spheres(sim.tomogram, start, sim.voxel_size)
    out = filter_outliers(sim.tomogram, refined, sim.voxel_size)
    n = len(C)
    kept_true = np.mean(out["status"][:n] == "accepted")
    print(f"\nsimulated: {kept_true:.0%} of {n} true vesicles kept; fakes: {list(out['status'][n:])} "
          f"{list(out['note'][n:])}")
    assert kept_true >= 0.9
    assert np.all(out["status"][n:] == "removed")
    acc = out.accepted()
    d = np.linalg.norm(acc.centers[:, None] - acc.centers[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert np.all(d >= (acc.radii[:, None] + acc.radii[None]) * (1 - 1e-6))


def test_membrane_visibility_threshold_follows_the_tomograms_contrast():
    """Faint membranes (a low-contrast reconstruction): the fixed score 5 removes true vesicles,
    the relative threshold keeps them; a sphere in empty cytosol is removed either way."""
    from cryoves.refine import detection_score

    centers, radii = random_vesicles(SHAPE, 16, r_range=(8.0, 10.0), seed=11)
    contrasts = np.random.default_rng(3).permutation(np.linspace(0.25, 0.55, len(radii)))
    tomo = draw_vesicles(SHAPE, centers, radii, contrasts=contrasts, noise=0.6, seed=11)
    table = refine_spheres(tomo, VesicleTable.from_arrays(centers, radii, voxel_size=VOXEL), VOXEL)
    grid = np.stack(np.meshgrid(np.arange(14, 51, 2.0), np.arange(14, 115, 2.0), np.arange(14, 115, 2.0),
                                indexing="ij"), -1).reshape(-1, 3)
    gap = np.min(np.linalg.norm(grid[:, None] - centers[None], axis=2) - radii[None], axis=1)
    empty = grid[np.argmax(gap)][None]
    assert gap.max() > 10  # nothing there
    table = VesicleTable.concat([table, VesicleTable.from_arrays(empty, [9.0], voxel_size=VOXEL,
                                                                 thickness=[2.0], density=[-0.6],
                                                                 stage="refine")])
    scores = np.array([detection_score(tomo, c, r, t) for c, r, t in
                       zip(table.centers, table.radii, table["thickness"])])
    true = np.arange(len(table) - 1)
    assert np.median(scores[true]) < 12 and np.sum(scores[true] < 5) >= 1 and scores[-1] < 3
    fixed = filter_outliers(tomo, table, VOXEL, min_radius_nm=10.0, min_score_relative=None)
    relative = filter_outliers(tomo, table, VOXEL, min_radius_nm=10.0)
    lost_fixed = np.sum(fixed["status"][true] == "removed")
    lost_relative = np.sum(relative["status"][true] == "removed")
    assert lost_fixed >= 1 and lost_relative < lost_fixed
    assert relative["status"][-1] == "removed" and fixed["status"][-1] == "removed"


def test_refits_computed_in_windows_equal_one_iteration_at_a_time(scene, monkeypatch):
    """The re-fits of several iterations are computed together (outliers._refit_windows), but
    the rows are judged iteration by iteration: the result is that of one iteration at a time,
    also for a row that an early iteration of a window rescues and rows that stay outliers."""
    import cryoves.outliers as outliers

    assert [list(w) for w in outliers._refit_windows(10)] == [[1], [2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [list(w) for w in outliers._refit_windows(2)] == [[1], [2]]
    assert outliers._refit_windows(0) == []
    tomo, centers, radii, refined = scene
    t = refined.copy()
    z, r, th = t["z"].copy(), t["radius"].copy(), t["thickness"].copy()
    z[5] += 3.0  # a wrong fit that a re-fit rescues (test_refit_can_rescue_a_bad_fit)
    r[5] *= 1.3
    th[5] *= 2.5
    t["z"], t["radius"], t["thickness"] = z, r, th
    calls, boxes = [], []
    real_map = outliers.vesicle_map

    def counting_map(func, *a, **k):
        if func is outliers._refit_item:
            calls.append(len(a[1]))
            boxes.append(sorted((tuple(np.round(c, 6)), round(float(m), 6)) for c, _, m, _ in a[1]))
        return real_map(func, *a, **k)

    monkeypatch.setattr(outliers, "vesicle_map", counting_map)
    windowed = filter_outliers(tomo, t, VOXEL, min_radius_nm=10.0)
    n_windowed, boxes_windowed = list(calls), sorted(b for call in boxes for b in call)
    calls.clear()
    boxes.clear()
    monkeypatch.setattr(outliers, "_refit_windows", lambda n: [range(j, j + 1) for j in range(1, n + 1)])
    single = filter_outliers(tomo, t, VOXEL, min_radius_nm=10.0)
    assert windowed == single
    # each (starting sphere, box margin) re-fitted one iteration at a time was re-fitted in the
    # windows too, with its own iteration's box
    assert set(b for call in boxes for b in call) <= set(boxes_windowed)
    assert windowed["note"][5].startswith("re-fitted") and windowed["status"][0] == "removed"
    # rows 0 and 1 are re-fitted in all 10 iterations: 4 maps instead of 10
    assert len(n_windowed) < len(calls) and sum(n_windowed) >= sum(calls)
