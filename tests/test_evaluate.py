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
