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


# --------------------------------------------------------------------------------------
# whole-segmentation evaluation and the held-out simulated suite
# --------------------------------------------------------------------------------------
STAGES = ("probability", "global", "adaptive", "refine", "outliers")


def evaluate_segmentation(result, truth_table: VesicleTable, truth_labels) -> dict:
    """Per-stage Dice and per-vesicle metrics of a :class:`cryoves.pipeline.SegmentationResult`.

    Returns a flat dict: ``dice_<stage>`` for each stage present, and ``tp, fp, fn,
    precision, recall, f1, delta_d, delta_c_nm, n_truth, n_pred`` of the final table.
    """
    masks = {}
    if getattr(result, "probability", None) is not None:
        masks["probability"] = result.probability
    for name, vol in (getattr(result, "stage_labels", None) or {}).items():
        masks[name] = vol
    masks.setdefault("outliers", result.labels)
    out = {f"dice_{k}": v for k, v in stage_dice(masks, truth_labels).items()}
    m = match_vesicles(result.table, truth_table)
    out.update(m.as_dict())
    out["n_truth"] = int(np.sum(truth_table["status"] == "accepted"))
    out["n_pred"] = int(np.sum(result.table["status"] == "accepted"))
    return out


@dataclass
class SuiteCase:
    """One held-out simulated tomogram: a name, its grid and simulator settings."""

    name: str
    shape_nm: tuple
    voxel_size: float
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(int(round(s / self.voxel_size / 4) * 4) for s in self.shape_nm)


def evaluation_suite(kind: str = "default") -> list[SuiteCase]:
    """The held-out simulated suite (seeds ≥ 50000, never used in training).

    ``"default"``: several voxel sizes 1.0–2.4 nm, low SNR, dense touching vesicles, many
    distractors, a narrow tilt range. ``"quick"``: two small cases for smoke tests.
    """
    size = (150, 300, 300)
    cases = [
        SuiteCase("baseline-1.4nm", size, 1.4, 50001, {}),
        SuiteCase("fine-1.0nm", (110, 220, 220), 1.0, 50002, {}),
        SuiteCase("coarse-2.4nm", size, 2.4, 50003, {}),
        SuiteCase("low-dose-1.6nm", size, 1.6, 50004, {"dose": 35.0}),
        SuiteCase("dense-1.8nm", size, 1.8, 50005, {"vesicle_fraction": 0.14, "cluster_jitter": 0.05}),
        SuiteCase("distractors-2.0nm", size, 2.0, 50006, {"n_endosomes": 3, "n_dense_core": 3, "n_ellipsoids": 5,
                                                          "n_tubes": 4, "n_mitochondria": 2, "n_gold": 12}),
        SuiteCase("narrow-tilt-2.2nm", size, 2.2, 50007, {"tilt_range": 45.0}),
    ]
    if kind == "default":
        return cases
    if kind == "quick":
        return [SuiteCase("quick-1.6nm", (100, 200, 200), 1.6, 50101, {}),
                SuiteCase("quick-2.2nm", (100, 200, 200), 2.2, 50102, {"tilt_range": 50.0, "dose": 60.0})]
    raise ValueError(f"unknown suite {kind!r}; choose 'default' or 'quick'")


def simulate_case(case: SuiteCase):
    """Simulate one suite case (unknown simulator settings raise a clear error)."""
    from cryoves.simulate import SimulationParams, simulate_tomogram

    known = set(SimulationParams.__dataclass_fields__)
    unknown = set(case.params) - known
    if unknown:
        raise ValueError(f"suite case {case.name}: simulator has no setting {sorted(unknown)}")
    params = SimulationParams(**case.params) if case.params else None
    return simulate_tomogram(shape=case.shape, voxel_size=case.voxel_size, seed=case.seed, params=params)


def summarize(rows: list[dict]) -> dict:
    """Mean of every numeric metric over rows (NaNs ignored)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float, np.floating, np.integer))] if rows else []
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
