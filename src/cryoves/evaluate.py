"""Accuracy metrics exactly as the CryoVesNet paper defines them.

- Voxel Dice between a predicted and a ground-truth vesicle mask (after each stage).
- Per vesicle: a prediction matches a ground-truth vesicle when each centre lies inside the
  other sphere (one-to-one, closest pairs first); TP / FP / FN and F1;
  ``delta_d`` = mean over TP of ``1 - min(dP, dGT) / max(dP, dGT)`` (d = diameter);
  ``delta_c`` = mean distance between matched centres, in nm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from cryoves.table import VesicleTable

__all__ = ["dice", "match_vesicles", "VesicleMatch", "stage_dice"]


def dice(pred, truth) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two masks (non-zero = foreground).

    Returns 1.0 when both masks are empty.
    """
    a = np.asarray(pred) != 0
    b = np.asarray(truth) != 0
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass
class VesicleMatch:
    """Result of :func:`match_vesicles`.

    Attributes
    ----------
    pairs : (K, 2) int array
        Row indices (prediction, truth) of matched vesicles.
    tp, fp, fn : int
    precision, recall, f1 : float
    delta_d : float
        Mean relative diameter error over TP (NaN without TP).
    delta_c_nm : float
        Mean centre distance over TP, nm (NaN without TP).
    center_errors_nm, diameter_errors : arrays over TP.
    """

    pairs: np.ndarray
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    delta_d: float
    delta_c_nm: float
    center_errors_nm: np.ndarray = field(repr=False)
    diameter_errors: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1, "delta_d": self.delta_d,
                "delta_c_nm": self.delta_c_nm}


def match_vesicles(pred: VesicleTable, truth: VesicleTable, *, accepted_only: bool = True) -> VesicleMatch:
    """Match predicted to ground-truth vesicles one-to-one (the paper's criterion).

    A pair is admissible when the predicted centre lies inside the true sphere *and* the
    true centre lies inside the predicted sphere, i.e. ``dist <= min(r_pred, r_true)``.
    Admissible pairs are taken closest first, each vesicle at most once.

    Parameters
    ----------
    pred, truth : VesicleTable
        Must share a voxel size (nm) — both describe the same tomogram grid.
    accepted_only : bool
        Ignore rows whose status is not ``accepted``.
    """
    if pred.voxel_size is None or truth.voxel_size is None:
        raise ValueError("both tables need a voxel_size to report distances in nm")
    if not np.isclose(pred.voxel_size, truth.voxel_size, rtol=1e-3):
        raise ValueError(f"tables are on different grids: {pred.voxel_size} vs {truth.voxel_size} nm")
    if accepted_only:
        pred, truth = pred.accepted(), truth.accepted()
    vs = truth.voxel_size
    pc, tc = pred.centers, truth.centers
    pr, tr = pred.radii, truth.radii
    pairs = []
    if len(pc) and len(tc):
        tree = cKDTree(tc)
        cand = tree.query_ball_point(pc, r=pr)  # truth centres inside each predicted sphere
        rows, cols, dists = [], [], []
        for i, js in enumerate(cand):
            for j in js:
                d = float(np.linalg.norm(pc[i] - tc[j]))
                if d <= tr[j]:
                    rows.append(i), cols.append(j), dists.append(d)
        used_p, used_t = set(), set()
        for k in np.argsort(dists, kind="stable"):
            i, j = rows[k], cols[k]
            if i not in used_p and j not in used_t:
                used_p.add(i), used_t.add(j)
                pairs.append((i, j))
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    tp = len(pairs)
    fp = len(pc) - tp
    fn = len(tc) - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    if tp:
        dp, dt = 2 * pr[pairs[:, 0]], 2 * tr[pairs[:, 1]]
        dd = 1.0 - np.minimum(dp, dt) / np.maximum(dp, dt)
        dc = np.linalg.norm(pc[pairs[:, 0]] - tc[pairs[:, 1]], axis=1) * vs
        delta_d, delta_c = float(dd.mean()), float(dc.mean())
    else:
        dd = dc = np.empty(0)
        delta_d = delta_c = float("nan")
    return VesicleMatch(pairs, tp, fp, fn, precision, recall, f1, delta_d, delta_c, dc, dd)


def stage_dice(stage_masks: dict, truth_labels) -> dict:
    """Dice of each stage's mask against the ground-truth labels (non-zero = vesicle).

    ``stage_masks`` maps stage name → label volume or mask; a float array named
    ``"probability"`` is binarised at 0.5.
    """
    out = {}
    for name, vol in stage_masks.items():
        vol = np.asarray(vol)
        if vol.dtype.kind == "f":
            vol = vol > 0.5
        out[name] = dice(vol, truth_labels)
    return out
