"""Tests for cryoves.threshold (global darkest-shell threshold, adaptive local threshold)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from cryoves.threshold import adaptive_threshold, default_thresholds, global_threshold, segment_stats

from _synthetic import draw_vesicles, random_vesicles

VOXEL = 2.0  # nm; min_radius 12 nm -> 6 voxels, k = 905 voxels


def _distance_map(shape, centers):
    """Distance to the nearest centre, and the index of that centre."""
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    best = np.full(shape, np.inf, np.float32)
    idx = np.zeros(shape, np.int32)
    for i, c in enumerate(centers):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        take = d < best
        best[take] = d[take]
        idx[take] = i
    return best, idx


def _naive_shell_means(tomo, prob, thresholds):
    out = []
    for t in thresholds:
        b = prob >= t
        # skimage's convention: outside the volume counts as foreground for the erosion
        shell = b & ~ndi.binary_erosion(b, ndi.generate_binary_structure(3, 1), border_value=1)
        out.append(tomo[shell].mean() if shell.any() else np.nan)
    return np.array(out)


def test_default_thresholds_include_one():
    t = default_thresholds()
    assert len(t) == 21 and t[0] == 0.8 and t[-1] == 1.0


def test_shell_means_match_naive_erosion():
    rng = np.random.default_rng(0)
    prob = ndi.gaussian_filter(rng.random((24, 30, 28)), 2)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    tomo = rng.standard_normal(prob.shape).astype(np.float32)
    ts = np.round(np.linspace(0.5, 0.9, 9), 2)
    res = global_threshold(tomo, prob, thresholds=ts)
    np.testing.assert_allclose(res.shell_means, _naive_shell_means(tomo, prob, ts), rtol=1e-6, equal_nan=True)


@pytest.fixture(scope="module")
def known_best():
    """Vesicles whose probability boundary crosses the membrane centre exactly at t = 0.90."""
    shape = (48, 80, 80)
    centers, radii = random_vesicles(shape, 8, r_range=(8, 10), seed=4)
    tomo = draw_vesicles(shape, centers, radii, thickness=2.0, noise=0.3, seed=1)
    d, idx = _distance_map(shape, centers)
    # linear fall-off: p = 0.905 at the membrane centre (R - 1), 0.05 per voxel
    prob = np.clip(0.905 - 0.05 * (d - (radii[idx] - 1.0)), 0, 1).astype(np.float32)
    return tomo, prob, len(centers)


def test_global_threshold_picks_darkest_shell(known_best):
    tomo, prob, n = known_best
    res = global_threshold(tomo, prob)
    assert 0.8 <= res.threshold <= 1.0
    assert 0.88 <= res.threshold <= 0.92, res.shell_means
    i = int(np.argmin(np.abs(res.thresholds - res.threshold)))
    assert res.shell_means[i] == np.nanmin(res.shell_means)
    assert res.labels.dtype == np.int32
    assert res.n_segments == n


def test_global_threshold_scale_invariant_and_inputs_untouched(known_best):
    tomo, prob, _ = known_best
    t0, p0 = tomo.copy(), prob.copy()
    a = global_threshold(tomo, prob)
    b = global_threshold(tomo * 3.0 + 50.0, prob)
    assert a.threshold == b.threshold
    np.testing.assert_array_equal(tomo, t0)
    np.testing.assert_array_equal(prob, p0)


def test_global_threshold_writes_its_labels_into_out(known_best):
    """``out``: the same labels, written into the given int32 volume whatever it held (the
    prefaulted volume of cryoves._memory.Prefaulted); a wrong one is refused before any work."""
    tomo, prob, _ = known_best
    a = global_threshold(tomo, prob)
    out = np.full(prob.shape, 7, np.int32)
    b = global_threshold(tomo, prob, out=out)
    assert b.labels is out and b.threshold == a.threshold
    np.testing.assert_array_equal(b.labels, a.labels)
    for bad in (np.zeros(prob.shape, np.int64), np.zeros(prob.shape[::-1], np.int32),
                np.zeros(prob.shape, np.int32, order="F"), prob.astype(np.int32)[::1, ::1, ::-1], [[0]]):
        with pytest.raises(ValueError, match="out must be a writable C-contiguous int32"):
            global_threshold(tomo, prob, out=bad)
    ro = np.zeros(prob.shape, np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be"):
        global_threshold(tomo, prob, out=ro)


def test_global_threshold_one_is_inclusive_and_mask():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[5:12, 5:12, 5:12] = 1.0
    tomo = np.ones_like(prob)
    res = global_threshold(tomo, prob, thresholds=[1.0])
    assert res.threshold == 1.0 and res.n_segments == 1
    assert res.shell_counts[0] > 0
    mask = np.zeros(prob.shape, bool)
    res2 = global_threshold(tomo, prob, thresholds=[1.0], mask=mask)
    assert np.isnan(res2.shell_means[0])


def test_global_threshold_ignores_a_sliver_of_saturated_voxels(known_best):
    """A map that reaches exactly 1.0 in two voxels, on a dark spot: the paper's rule takes 1.0
    (a 2-voxel "shell" is the darkest) and loses every vesicle; a candidate whose shell is under
    a tenth of the largest does not compete."""
    tomo, prob, n = known_best
    tomo, prob = tomo.copy(), np.minimum(prob, 0.99)
    far = np.unravel_index(np.argmin(prob), prob.shape)
    z, y, x = far
    prob[z, y, x:x + 2] = 1.0
    tomo[z, y, x:x + 2] = tomo.min() - 10.0
    paper = global_threshold(tomo, prob, min_shell_fraction=0.0)
    assert paper.threshold == 1.0 and paper.n_segments == 1
    res = global_threshold(tomo, prob)
    assert 0.88 <= res.threshold <= 0.92 and res.n_segments == n + 1
    with pytest.raises(ValueError, match="min_shell_fraction"):
        global_threshold(tomo, prob, min_shell_fraction=1.5)


def test_global_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        global_threshold(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="3-D"):
        global_threshold(np.zeros((4, 4)), np.zeros((4, 4)))


def _sigmoid_sphere(shape, c, r, peak=0.999, soft=0.8):
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    return peak / (1.0 + np.exp(np.minimum((d - r) / soft, 50.0)))


@pytest.fixture(scope="module")
def adaptive_case():
    shape = (48, 96, 96)
    rng = np.random.default_rng(3)
    prob = np.zeros(shape, np.float32)
    # ordinary vesicles (r = 9 voxels = 18 nm)
    singles = [(12, 14, 14), (12, 14, 40), (12, 40, 14), (36, 14, 14), (36, 40, 40), (36, 14, 40),
               (12, 40, 40), (36, 40, 14), (24, 70, 14), (24, 14, 70)]
    for c in singles:
        prob = np.maximum(prob, _sigmoid_sphere(shape, c, 9))
    # two touching vesicles: merged at 0.82 (neck p = 0.87), split above
    pair = [(24, 66, 55), (24, 66, 70)]
    for c in pair:
        prob = np.maximum(prob, _sigmoid_sphere(shape, c, 9))
    # a partial vesicle: weak probability, only a core above the global threshold
    partial = (24, 84, 84)
    prob = np.maximum(prob, _sigmoid_sphere(shape, partial, 9, peak=0.835))
    # an elongated rod (extent ~ pi/4 > 0.75)
    rod = np.zeros(shape, np.float32)
    rod[40:46, 80:86, 20:70] = 0.99
    prob = np.maximum(prob, rod)
    # tiny specks
    for c in [(4, 88, 4), (44, 4, 88), (4, 4, 60)]:
        prob = np.maximum(prob, _sigmoid_sphere(shape, c, 2.5))
    prob = np.clip(prob + 0.002 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    threshold = 0.82
    labels, _ = ndi.label(prob >= threshold, structure=ndi.generate_binary_structure(3, 1))
    return dict(prob=prob, labels=labels.astype(np.int32), threshold=threshold, singles=singles, pair=pair,
                partial=partial)


def test_adaptive_threshold_splits_grows_and_drops(adaptive_case):
    a = adaptive_case
    prob, labels = a["prob"], a["labels"]
    lab_before = labels.copy()
    # sanity: the pair is one segment at the global threshold, the partial core is too small
    assert labels[a["pair"][0]] == labels[a["pair"][1]] != 0
    k = 4 / 3 * np.pi * (12 / VOXEL) ** 3
    assert (labels == labels[a["partial"]]).sum() < k

    out = adaptive_threshold(prob, labels, a["threshold"], VOXEL, min_radius_nm=12.0)  # the paper's size rule
    np.testing.assert_array_equal(labels, lab_before)
    assert out.dtype == np.int32
    # every ordinary vesicle kept, one label each
    single_labels = [out[c] for c in a["singles"]]
    assert all(v != 0 for v in single_labels) and len(set(single_labels)) == len(single_labels)
    # the pair split into two segments
    la, lb = out[a["pair"][0]], out[a["pair"][1]]
    assert la != 0 and lb != 0 and la != lb
    va, vb = (out == la).sum(), (out == lb).sum()
    assert abs(int(va) - int(vb)) < 0.2 * max(va, vb)
    # the partial vesicle grown to at least the minimum volume
    lp = out[a["partial"]]
    assert lp != 0 and (out == lp).sum() >= k
    # rod and specks removed
    assert out[43, 83, 45] == 0
    for c in [(4, 88, 4), (44, 4, 88), (4, 4, 60)]:
        assert out[c] == 0
    assert out.max() == len(a["singles"]) + 3
    assert set(np.unique(out)) == set(range(out.max() + 1))
    st = segment_stats(out)
    assert np.all((st["extent"] >= 0.25) & (st["extent"] <= 0.75))


def test_adaptive_threshold_paper_extent_does_not_split_pair(adaptive_case):
    """With the extent criterion alone an axis-aligned merged pair (extent 0.57) stays merged."""
    a = adaptive_case
    out = adaptive_threshold(a["prob"], a["labels"], a["threshold"], VOXEL, extent_split=0.25, fill_split=None)
    la, lb = out[a["pair"][0]], out[a["pair"][1]]
    assert la == lb != 0


def test_adaptive_threshold_progress_and_validation(adaptive_case):
    a = adaptive_case
    calls = []
    adaptive_threshold(a["prob"], a["labels"], a["threshold"], VOXEL, progress=lambda *x: calls.append(x))
    assert calls and calls[-1][1] == calls[-1][2]
    with pytest.raises(ValueError, match="voxel_size"):
        adaptive_threshold(a["prob"], a["labels"], a["threshold"], 0)
    with pytest.raises(ValueError, match="shape"):
        adaptive_threshold(a["prob"], a["labels"][:-1], a["threshold"], VOXEL)


def test_adaptive_threshold_does_not_split_a_single_elongated_segment():
    """A large elongated segment without a neck is tried (low fill) but not cut into pieces."""
    shape = (40, 64, 96)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    prob = np.zeros(shape, np.float32)
    for c in [(20, 16, 14), (20, 48, 14), (20, 16, 40), (20, 48, 40)]:
        prob = np.maximum(prob, _sigmoid_sphere(shape, c, 8))
    # ellipsoid with semi-axes 9, 9, 15 voxels: smooth probability, no neck
    q = np.sqrt(((zz - 20) / 9) ** 2 + ((yy - 32) / 9) ** 2 + ((xx - 72) / 15) ** 2)
    prob = np.maximum(prob, 0.999 / (1 + np.exp(np.minimum((q - 1) * 9 / 0.8, 50))))
    prob += 0.002 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    labels, _ = ndi.label(prob >= 0.82, structure=ndi.generate_binary_structure(3, 1))
    st = segment_stats(labels)
    big = labels[20, 32, 72]
    i = list(st["label"]).index(big)
    assert st["zscore"][i] > 1 and st["fill"][i] < 0.6
    out = adaptive_threshold(prob, labels.astype(np.int32), 0.82, VOXEL)
    assert out[20, 32, 72] != 0
    assert out[20, 32, 62] == out[20, 32, 72] == out[20, 32, 82]
    assert out.max() == 5


def test_adaptive_threshold_splits_saturated_cluster_of_touching_vesicles():
    """A trained network gives p = 1 over a whole clump of touching vesicles: no threshold splits
    it, so the split must come from the necks of the clump's shape."""
    shape = (40, 80, 100)
    zz, yy, xx = np.indices(shape)
    r = 8.0
    centres = [(20, 20, 15 + 15 * i) for i in range(5)] + [(20, 33, 22), (20, 33, 37), (20, 33, 52)]
    prob = np.zeros(shape, np.float32)
    for c in centres:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r ** 2] = 1.0
    labels, n = ndi.label(prob >= 0.9)
    assert n == 1  # everything touches: one merged segment
    voxel = 1.0  # min_radius_nm 6 -> vesicles of radius 8 voxels are 2.4x the minimal volume
    out = adaptive_threshold(prob, labels, 0.9, voxel, min_radius_nm=6.0)
    found = {int(out[c]) for c in centres}
    assert 0 not in found, "a vesicle of the clump was dropped"
    assert len(found) == len(centres), f"{len(centres)} touching vesicles came out as {len(found)} segments"


def test_adaptive_threshold_keeps_a_small_part_split_off_a_clump():
    """A split cuts a clump above the global threshold: a smaller vesicle's part (0.83 of the
    minimal volume) cannot grow (its neighbours touch it) and is kept from split_part_min on;
    the paper's rule (1) drops it."""
    shape = (40, 60, 80)
    zz, yy, xx = np.indices(shape)
    spheres = [((20, 30, 18), 8.0), ((20, 30, 34), 8.0), ((20, 30, 47.5), 5.6)]
    prob = np.zeros(shape, np.float32)
    for c, r in spheres:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r ** 2] = 1.0
    labels, n = ndi.label(prob >= 0.9)
    assert n == 1
    k = 4.0 / 3.0 * np.pi * 6.0 ** 3
    small = (20, 30, 48)
    paper = adaptive_threshold(prob, labels, 0.9, 1.0, min_radius_nm=6.0, split_part_min=1.0)
    assert paper.max() == 2 and paper[small] == 0
    out = adaptive_threshold(prob, labels, 0.9, 1.0, min_radius_nm=6.0)  # default 0.5
    assert out.max() == 3 and out[small] != 0
    assert 0.5 * k <= (out == out[small]).sum() < k
    assert len({int(out[c]) for c in [(20, 30, 18), (20, 30, 34), small]}) == 3
    with pytest.raises(ValueError, match="split_part_min"):
        adaptive_threshold(prob, labels, 0.9, 1.0, split_part_min=1.5)
    from cryoves.pipeline import SegmentParams

    assert SegmentParams().stage_kwargs("adaptive", 2.0)["split_part_min"] == 0.5
    with pytest.raises(ValueError, match="split_part_min"):
        SegmentParams(split_part_min=-0.1)
    # a segment of the same size that no split made is still dropped
    alone = np.zeros(shape, np.float32)
    alone[(zz - 20) ** 2 + (yy - 30) ** 2 + (xx - 40) ** 2 <= 5.6 ** 2] = 1.0
    lab1, _ = ndi.label(alone >= 0.9)
    assert adaptive_threshold(alone, lab1, 0.9, 1.0, min_radius_nm=6.0).max() == 0


def test_add_weak_segments_validation_and_inputs_untouched():
    from cryoves.threshold import add_weak_segments

    shape = (24, 32, 32)
    tomo = np.zeros(shape, np.float32)
    prob = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    labels[2:4, 2:4, 2:4] = 1  # a fragment: released, and put back (no sphere took it over)
    before = labels.copy()
    out = add_weak_segments(tomo, prob, labels, 2.0)
    np.testing.assert_array_equal(labels, before)
    np.testing.assert_array_equal(out, labels)
    with pytest.raises(ValueError, match="low_threshold"):
        add_weak_segments(tomo, prob, labels, 2.0, low_threshold=0)
    with pytest.raises(ValueError, match="same shape"):
        add_weak_segments(tomo, prob[1:], labels, 2.0)
    with pytest.raises(ValueError, match="min_radius_nm"):
        add_weak_segments(tomo, prob, labels, 2.0, min_radius_nm=50)


def test_add_weak_segments_only_on_a_weak_map(small_simulation, oracle_probability):
    """One half-believed vesicle in an otherwise confident map is left alone (on confident maps
    the leftover half-beliefs are mostly look-alikes); with the gate off it is rescued."""
    from cryoves.threshold import add_weak_segments

    sim = small_simulation
    T = sim.table
    prob = oracle_probability.copy()
    room = np.min(np.minimum(T.centers, np.array(prob.shape) - 1 - T.centers), axis=1) - T.radii
    i = int(np.argmax(room))  # the vesicle farthest inside the volume
    c, r = T.centers[i], T.radii[i]
    zz, yy, xx = np.indices(prob.shape, dtype=np.float32)
    inside = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r + 2
    prob[inside] *= 0.75  # this vesicle now peaks at 0.75, below every global threshold candidate
    g = global_threshold(sim.tomogram, prob)
    ci = tuple(np.rint(c).astype(int))
    assert g.labels[ci] == 0
    frac = np.count_nonzero(inside & (prob >= 0.5)) / np.count_nonzero(prob >= 0.5)
    assert frac < 0.2
    gated = add_weak_segments(sim.tomogram, prob, g.labels, sim.voxel_size, min_weak_fraction=0.2)
    assert gated[ci] == 0
    rescued = add_weak_segments(sim.tomogram, prob, g.labels, sim.voxel_size, min_weak_fraction=0.0)
    assert rescued[ci] > g.labels.max()


def test_large_candidates_are_verified_and_small_segments_are_not_released():
    """The pipeline's large-vesicle pass: regions of a shrunk view become segments only where a
    membrane is found, and small segments of the main map stay as they are."""
    from _synthetic import draw_vesicles
    from cryoves.predict import large_regions
    from cryoves.threshold import add_weak_segments

    vs = 2.0
    shape = (56, 96, 96)
    centers = np.array([[28.0, 30.0, 30.0], [28.0, 30.0, 70.0], [28.0, 68.0, 48.0]])
    radii = np.array([7.0, 7.0, 16.0])  # 14, 14 and 32 nm: the last too large for the network
    tomo = draw_vesicles(shape, centers, radii, thickness=2.0, noise=0.3, seed=3)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    dist = [np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) for c in centers]
    labels = np.zeros(shape, np.int32)
    labels[dist[0] <= 5.5] = 1  # small segments (below a 20 nm sphere) of the main map
    labels[dist[1] <= 5.5] = 2
    part = centers[2] + np.array([0.0, 0.0, 8.0])  # the main map's fragment of the large vesicle
    labels[np.sqrt((zz - part[0]) ** 2 + (yy - part[1]) ** 2 + (xx - part[2]) ** 2) <= 3.5] = 3
    shrunk = np.zeros(shape, np.float32)
    shrunk[dist[2] <= 14.0] = 0.95            # the large vesicle as a shrunk pass sees it
    fake = np.array([28.0, 70.0, 82.0])        # and a large belief with no membrane under it
    shrunk[np.sqrt((zz - fake[0]) ** 2 + (yy - fake[1]) ** 2 + (xx - fake[2]) ** 2) <= 11.0] = 0.9
    shrunk[dist[0] <= 6.0] = 0.9               # a small one: below the region size, ignored
    cand = large_regions(shrunk, vs, min_radius_nm=20.0)
    assert cand[tuple(centers[2].astype(int))] > 0 and cand[tuple(centers[0].astype(int))] == 0
    out = add_weak_segments(tomo, cand, labels, vs, low_threshold=0.5, min_radius_nm=20.0, max_radius_nm=34.0,
                            min_weak_fraction=0.0, fragment_radius_nm=0.0)
    np.testing.assert_array_equal(out[labels > 0], labels[labels > 0])  # nothing released or changed
    big = out[tuple(centers[2].astype(int))]
    assert big > 3 and np.count_nonzero(out == big) > 0.8 * 4 / 3 * np.pi * 16 ** 3
    assert out[tuple(fake.astype(int))] == 0  # no membrane: not a segment
    assert set(np.unique(out)) == {0, 1, 2, 3, big}
    # the default fragment rule would have released the small segments, and the verified large
    # sphere would have taken the one inside it over
    released = add_weak_segments(tomo, cand, labels, vs, low_threshold=0.5, min_radius_nm=20.0,
                                 max_radius_nm=34.0, min_weak_fraction=0.0)
    assert not np.any(released == 3)
    with pytest.raises(ValueError, match="fragment_radius_nm"):
        add_weak_segments(tomo, cand, labels, vs, fragment_radius_nm=-1.0)


def test_slab_by_slab_stages_equal_whole_volume(monkeypatch):
    """The global threshold's shell statistics, the weak-map test and the adaptive relabelling done
    slab by slab (bounded memory) give exactly the whole-volume results."""
    import cryoves.threshold as T

    rng = np.random.default_rng(4)
    shape = (23, 40, 37)
    prob = ndi.gaussian_filter(rng.random(shape), 2.0)
    prob = ((prob - prob.min()) / np.ptp(prob)).astype(np.float32)
    tomo = rng.normal(size=shape).astype(np.float32)
    whole = T.global_threshold(tomo, prob, thresholds=np.linspace(0.3, 0.9, 13))
    labels = whole.labels
    weak = {}
    for low in (0.2, 0.5, 0.7):
        for frac in (0.05, 0.3, 0.9):
            weak[low, frac] = T._map_is_weak(prob, labels, low, frac, 30.0)
    monkeypatch.setattr(T, "_SLAB_VOXELS", 3 * 40 * 37)  # slabs of 3 planes
    sliced = T.global_threshold(tomo, prob, thresholds=np.linspace(0.3, 0.9, 13))
    for minlength in (0, int(labels.max()) + 7):
        np.testing.assert_array_equal(T._label_counts(labels, minlength),
                                      np.bincount(labels.ravel(), minlength=minlength))
    np.testing.assert_array_equal(sliced.shell_means, whole.shell_means)
    np.testing.assert_array_equal(sliced.shell_counts, whole.shell_counts)
    assert sliced.threshold == whole.threshold
    for (low, frac), w in weak.items():
        assert T._map_is_weak(prob, labels, low, frac, 30.0) == w
        # the rule written out on whole volumes
        stats = T.segment_stats(labels)
        trusted = np.isin(labels, stats["label"][stats["volume"] >= 30.0])
        cand = (prob >= np.float32(low)) & ~ndi.binary_dilation(trusted, structure=T._structure(1), iterations=2)
        n_belief = np.count_nonzero(prob >= np.float32(low))
        assert w == (n_belief > 0 and not np.count_nonzero(cand) < frac * n_belief)
    assert len(set(weak.values())) == 2  # both answers were exercised


def test_verified_sphere_takes_its_voxels_back_from_a_merged_blob(small_simulation, oracle_probability):
    """A segment of at least merged_ratio x the ball's volume (a blob that merged the vesicle with
    its surroundings) gives the verified sphere its voxels; a smaller one keeps them."""
    from cryoves.threshold import add_weak_segments

    sim = small_simulation
    T = sim.table
    prob = oracle_probability.copy()
    room = np.min(np.minimum(T.centers, np.array(prob.shape) - 1 - T.centers), axis=1) - T.radii
    i = int(np.argmax(room))
    c, r = T.centers[i], T.radii[i]
    zz, yy, xx = np.indices(prob.shape, dtype=np.float32)
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    prob[d <= r + 2] *= 0.75  # a half-believed vesicle: a candidate, not a segment
    g = global_threshold(sim.tomogram, prob)
    ball = d <= r
    side = ball & (xx > c[2] + 0.4 * r)  # the blob holds one side of the vesicle, not its centre
    ci = tuple(np.rint(c).astype(int))
    blob = g.labels.max() + 1
    away = np.flatnonzero(((g.labels == 0) & (d > r + 4)).ravel())
    for extra, expect_taken in ((int(9 * ball.sum()), True), (int(2 * ball.sum()), False)):
        labels = g.labels.copy()
        labels.ravel()[away[:extra]] = blob  # blob voxels away from the vesicle
        labels[side] = blob
        assert labels[ci] == 0
        out = add_weak_segments(sim.tomogram, prob, labels, sim.voxel_size, min_weak_fraction=0.0)
        new = out[ci]
        assert new > blob, "the vesicle was not verified"
        taken = np.count_nonzero(out[side] == new) / np.count_nonzero(side)
        assert taken > 0.9 if expect_taken else taken == 0.0
        off = add_weak_segments(sim.tomogram, prob, labels, sim.voxel_size, min_weak_fraction=0.0,
                                merged_ratio=None)
        assert off[ci] > blob and np.count_nonzero(off[side] == off[ci]) == 0
    with pytest.raises(ValueError, match="merged_ratio"):
        add_weak_segments(sim.tomogram, prob, labels, sim.voxel_size, merged_ratio=0.5)


def test_add_weak_segments_adds_no_label_volume_on_a_confident_map():
    from cryoves.threshold import add_weak_segments

    shape = (24, 32, 32)
    prob = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    labels[4:20, 6:22, 6:22] = 1
    prob[labels > 0] = 0.99
    out = add_weak_segments(np.zeros(shape, np.float32), prob, labels, 2.0)
    assert out is labels  # nothing to add: the same int32 volume, not a copy
    out16 = add_weak_segments(np.zeros(shape, np.float32), prob, labels.astype(np.uint16), 2.0)
    assert out16.dtype == np.int32 and np.array_equal(out16, labels)


def test_adaptive_threshold_same_labels_on_one_core_and_many(monkeypatch):
    """The segments to split (and their parts, depth first) are split ahead on worker threads:
    the labels (numbering included) must be those of the plain loop on one core."""
    import cryoves.threshold as T

    shape = (40, 80, 100)
    zz, yy, xx = np.indices(shape)
    prob = np.zeros(shape, np.float32)
    # saturated clumps (split at distance necks, then again) and soft pairs (split by threshold)
    for c in [(20, 20, 15 + 15 * i) for i in range(5)] + [(20, 33, 22), (20, 33, 37), (20, 33, 52)]:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 64] = 1.0
    for z0 in (8, 30):
        for x0 in (10, 40, 70):
            for c in [(z0, 62, x0), (z0, 62, x0 + 11)]:  # merged at 0.8, split by threshold
                prob = np.maximum(prob, _sigmoid_sphere(shape, c, 7))
    rng = np.random.default_rng(5)
    prob = np.clip(prob + 0.002 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    labels, n = ndi.label(prob >= 0.8, structure=ndi.generate_binary_structure(3, 1))
    labels = labels.astype(np.int32)
    assert n == 7  # six merged pairs and one clump: several segments to split, in turn
    from cryoves import _parallel

    outs = []
    for cores in (1, 4):
        monkeypatch.setattr(_parallel, "n_cores", lambda c=cores: c)
        outs.append(adaptive_threshold(prob, labels, 0.8, 1.0, min_radius_nm=5.0))
    assert len(np.unique(outs[0])) - 1 == 20  # every pair and the clump's eight were split
    np.testing.assert_array_equal(outs[0], outs[1])
    # the labels of the stack of segments the stage used before its split trees (commit 71df4a6)
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(outs[0], dtype="<i4").tobytes()).hexdigest()
    assert digest[:16] == "5db787344bba26d7"


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_components_sparse_and_dense_equal_ndi_label(monkeypatch, connectivity):
    # the weak-segment candidates: components numbered, sized and listed as ndi.label gives
    # them, whether the mask is labelled as a volume or linked voxel by voxel (few voxels set)
    from cryoves import threshold as T

    rng = np.random.default_rng(7)
    structure = T._structure(connectivity)
    for trial in range(25):
        shape = tuple(int(s) for s in rng.integers(1, 24, 3))
        m = rng.random(shape) < rng.choice([0.0, 0.003, 0.02, 0.1, 0.4])
        if trial == 0:
            m[:] = True  # one component touching every border
        lab, n = ndi.label(m, structure=structure)
        for frac in (1.0, 0.0):  # every mask sparse, then every mask dense
            monkeypatch.setattr(T._Components, "SPARSE_FRACTION", frac)
            c = T._Components(m, structure)
            assert (c._dense is None) == (frac == 1.0 or not m.any())  # the path under test
            assert c.n == n
            assert np.array_equal(c.sizes, np.bincount(lab.ravel(), minlength=n + 1)[1:])
            for i in range(n):
                assert np.array_equal(c.points(i), np.argwhere(lab == i + 1))
