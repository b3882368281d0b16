import numpy as np
import pytest

from cryoves import VesicleTable
from cryoves.evaluate import dice, match_vesicles, stage_dice


def test_dice():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    with pytest.raises(ValueError):
        dice(a, b[:2])


def test_match_paper_criterion_and_metrics():
    truth = VesicleTable.from_arrays([[10, 10, 10], [10, 10, 40], [40, 40, 40]], [10, 10, 10], voxel_size=2.0)
    pred = VesicleTable.from_arrays(
        [[10, 10, 12],     # TP, 2 vox off, same size
         [10, 10, 46],     # 6 vox off: inside truth r=10, but truth centre not inside pred r=5 -> no match
         [80, 80, 80]],    # FP
        [10, 5, 10], voxel_size=2.0)
    m = match_vesicles(pred, truth)
    assert (m.tp, m.fp, m.fn) == (1, 2, 2)
    assert m.pairs.tolist() == [[0, 0]]
    assert m.f1 == pytest.approx(2 / (2 + 2 + 2))
    assert m.delta_c_nm == pytest.approx(4.0)
    assert m.delta_d == pytest.approx(0.0)


def test_match_one_to_one_and_delta_d():
    truth = VesicleTable.from_arrays([[10, 10, 10]], [10], voxel_size=1.0)
    pred = VesicleTable.from_arrays([[10, 10, 11], [10, 10, 10]], [8, 12], voxel_size=1.0)
    m = match_vesicles(pred, truth)
    assert m.tp == 1 and m.fp == 1
    assert m.pairs[0, 0] == 1  # the closer one wins
    assert m.delta_d == pytest.approx(1 - 10 / 12)


def test_match_ignores_removed_and_checks_grid():
    truth = VesicleTable.from_arrays([[10, 10, 10]], [10], voxel_size=1.0)
    pred = VesicleTable.from_arrays([[10, 10, 10]], [10], voxel_size=1.0, status=["removed"])
    assert match_vesicles(pred, truth).tp == 0
    with pytest.raises(ValueError, match="grid"):
        match_vesicles(VesicleTable.from_arrays([[1, 1, 1]], [1], voxel_size=2.0), truth)


def test_stage_dice_binarises_probability():
    truth = np.zeros((5, 5, 5), np.uint16)
    truth[1:4, 1:4, 1:4] = 3
    prob = truth.astype(np.float32) / 3 * 0.9
    out = stage_dice({"probability": prob, "global": truth}, truth)
    assert out == {"probability": 1.0, "global": 1.0}


# -- per-stage truth bookkeeping ---------------------------------------------------------
def _ball(shape, c, r, value):
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return np.where((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r, value, 0)


def _staged_result():
    """A SegmentationResult whose stages treat three true vesicles in known ways."""
    from cryoves.pipeline import SegmentationResult

    shape = (40, 40, 60)
    truth = VesicleTable.from_arrays([[20, 20, 10], [20, 20, 30], [20, 20, 50]], [6, 6, 6], voxel_size=2.0)
    prob = np.zeros(shape, np.float32)
    for c in truth.centers:
        prob += _ball(shape, c, 6, 0.9).astype(np.float32)
    prob += _ball(shape, (5, 5, 5), 3, 0.9).astype(np.float32)          # a false blob
    glob = np.zeros(shape, np.int32)
    for i, c in enumerate(truth.centers):
        glob += _ball(shape, c, 6, i + 1).astype(np.int32)
    glob += _ball(shape, (5, 5, 5), 3, 9).astype(np.int32)               # false segment
    glob += _ball(shape, (35, 35, 55), 3, 8).astype(np.int32)            # another false segment
    adapt = glob.copy()
    adapt[adapt == 3] = 0                                                # loses the third vesicle
    adapt[adapt == 8] = 0                                                # and drops one false segment
    refine = VesicleTable.from_arrays([[20, 20, 10], [20, 20, 31], [5, 5, 5]], [6, 6, 3], voxel_size=2.0)
    final = VesicleTable.from_arrays([[20, 20, 10], [20, 20, 31], [5, 5, 5]], [6, 6, 3], voxel_size=2.0,
                                     status=["accepted", "removed", "accepted"])
    from cryoves import render_labels
    result = SegmentationResult(
        table=final, labels=render_labels(final, shape), probability=prob,
        stage_labels={"global": glob, "adaptive": adapt, "refine": render_labels(refine, shape),
                      "outliers": render_labels(final, shape)},
        stage_tables={"refine": refine, "outliers": final}, voxel_size=2.0)
    return result, truth


def test_stage_truth_counts():
    from cryoves.evaluate import stage_truth_counts
    result, truth = _staged_result()
    out = stage_truth_counts(result, truth)
    assert list(out)[:3] == ["found_probability", "lost_probability", "fp_probability"]
    assert (out["found_probability"], out["lost_probability"], out["fp_probability"]) == (3, 0, 1)
    assert (out["found_global"], out["lost_global"], out["fp_global"]) == (3, 0, 2)
    assert (out["found_adaptive"], out["lost_adaptive"], out["fp_adaptive"]) == (2, 1, 1)
    assert (out["found_refine"], out["lost_refine"], out["fp_refine"]) == (2, 0, 1)
    # the outlier stage removed a true vesicle and let the false sphere through
    assert (out["found_outliers"], out["lost_outliers"], out["fp_outliers"]) == (1, 1, 1)


def test_evaluate_segmentation_reports_stages_and_final():
    from cryoves.evaluate import evaluate_segmentation
    from cryoves import render_labels
    result, truth = _staged_result()
    out = evaluate_segmentation(result, truth, render_labels(truth, result.labels.shape))
    assert out["lost_outliers"] == 1 and out["fp_global"] == 2
    assert (out["tp"], out["fp"], out["fn"], out["n_truth"], out["n_pred"]) == (1, 1, 2, 3, 2)
    assert 0 < out["dice_adaptive"] < 1 and "dice_probability" in out


def test_summarize_sums_counts_and_averages_rates():
    from cryoves.evaluate import summarize
    rows = [{"case": "a", "f1": 1.0, "tp": 3, "lost_global": 1, "delta_d": float("nan")},
            {"case": "b", "f1": 0.5, "tp": 4, "lost_global": 2, "delta_d": 0.02}]
    s = summarize(rows)
    assert s["f1"] == pytest.approx(0.75) and s["tp"] == 7 and s["lost_global"] == 3
    assert s["delta_d"] == pytest.approx(0.02) and "case" not in s
    assert summarize([]) == {}


# -- suites ------------------------------------------------------------------------------
def test_stress_suite_cases():
    from cryoves.evaluate import evaluation_suite
    from cryoves.simulate import HELD_OUT_FROM_TRAINING, SimulationParams

    stress = evaluation_suite("stress")
    assert 10 <= len(stress) <= 12
    assert len({c.name for c in stress}) == len(stress)
    seeds = {c.seed for c in stress}
    others = {c.seed for kind in ("default", "quick") for c in evaluation_suite(kind)}
    assert len(seeds) == len(stress) and not seeds & others
    params = [SimulationParams(voxel_size=c.voxel_size, seed=c.seed, **c.params) for c in stress]
    default = SimulationParams()
    # at least two renderings random_params never draws
    unseen = [p for p in params if any(getattr(p, k) != getattr(default, k) for k in HELD_OUT_FROM_TRAINING)]
    assert len(unseen) >= 2
    assert any(p.dose <= 60 and p.voltage_kv == 200 and not p.ctf_correction for p in params)
    assert any(p.tilt_range <= 50 for p in params)
    assert any(p.voxel_size <= 1.5 for p in params) and any(p.voxel_size >= 2.5 for p in params)
    assert any(p.extra_ice_nm >= 200 for p in params)
    assert any(p.radius_min_nm <= 14 and p.radius_max_nm >= 32 for p in params)
    for c in stress:
        assert all(s % 4 == 0 for s in c.shape) and 64 <= min(c.shape) and max(c.shape) <= 320, c
    with pytest.raises(ValueError, match="stress"):
        evaluation_suite("hard")


def test_development_copy_of_a_suite():
    """seed_offset: the same cases at other seeds, named apart, sharing no seed with any suite."""
    from cryoves.evaluate import evaluation_suite

    held_out = {c.seed for kind in ("default", "stress", "quick") for c in evaluation_suite(kind)}
    for kind in ("default", "stress"):
        base, dev = evaluation_suite(kind), evaluation_suite(kind, seed_offset=33000)
        assert [(c.shape_nm, c.voxel_size, c.params) for c in dev] == [(c.shape_nm, c.voxel_size, c.params) for c in base]
        assert [c.seed - b.seed for c, b in zip(dev, base)] == [33000] * len(base)
        assert all(c.name == b.name + "-dev33000" for c, b in zip(dev, base))
        assert not {c.seed for c in dev} & held_out
    assert evaluation_suite("stress", seed_offset=0) == evaluation_suite("stress")
    with pytest.raises(ValueError, match="seed_offset"):
        evaluation_suite("stress", seed_offset=1.5)
