"""The whole CryoVesNet method composed: tomogram -> vesicle table and label volumes.

Each stage is one public function here, which calls its core module(s); :func:`segment` runs
them in order, and the napari stage widgets call the same functions one at a time, so a
stage-by-stage run gives the result of :func:`segment` with the same parameters:

* ``predict``: :func:`predict_stage`, :func:`cryoves.predict.predict_probability` at the
  model's scale and again at ``large_scale`` (the large-vesicle pass) -> ``probability``;
* ``global``: :func:`global_stage`, :func:`cryoves.threshold.global_threshold`, then
  :func:`cryoves.threshold.add_weak_segments` (weak segments; large-vesicle candidates) ->
  ``threshold``, labels;
* ``adaptive``: :func:`adaptive_stage`, :func:`cryoves.threshold.adaptive_threshold` -> labels;
* ``refine``: :func:`refine_stage`, :func:`cryoves.refine.refine_spheres` -> table
  (``stage_tables``);
* ``outliers``: :func:`outliers_stage`, :func:`cryoves.outliers.filter_outliers` -> the final
  ``table``.

Every parameter of every stage is a field of :class:`SegmentParams` (lengths in nm; the
few sampling parameters that are naturally voxel counts end in ``_vox``).

Region mask
-----------
``mask`` (e.g. the presynaptic cytoplasm) restricts the search: the global threshold is
chosen from membrane shells inside the mask only, segments whose centroid lies outside are
dropped before refinement, and rows whose refined centre lies outside are marked
``removed`` (note ``"centre outside region mask"``). Any non-zero voxel is inside.

Identifiers
-----------
Table ids are the adaptive-stage segment labels, kept through refinement and outlier
removal, so a row can be traced back to every per-stage label volume.

Importing this module does not import TensorFlow (prediction imports it when it runs).
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np

from cryoves import _memory, _workers
from cryoves import outliers as _outliers
from cryoves import predict as _predict
from cryoves import refine as _refine
from cryoves import threshold as _threshold
from cryoves._progress import ProgressCallback, report
from cryoves.io import memmap_source, release_pages
from cryoves.table import VesicleTable, check_voxel_size, render_labels
from cryoves.validate import check_inputs, check_result

__all__ = ["SegmentParams", "SegmentationResult", "segment", "STAGES", "predict_stage", "predict_in_child",
           "PREDICTION_PROCESSES", "CHILD_PROCESS_VOXELS", "global_stage",
           "adaptive_stage", "refine_stage", "outliers_stage"]

#: Pipeline stages, in order (keys of ``timings`` and ``stage_labels``).
STAGES = ("predict", "global", "adaptive", "refine", "outliers")


def _default(fn, name):
    """The default of argument ``name`` of stage function ``fn`` (one source of truth)."""
    value = inspect.signature(fn).parameters[name].default
    if value is inspect.Parameter.empty:
        raise TypeError(f"{fn.__qualname__}() has no default for {name!r}")
    return tuple(value) if isinstance(value, list) else value


@dataclass
class SegmentParams:
    """Every parameter of :func:`segment`, stage by stage (lengths in nm).

    Every default is read from the stage function's signature (one source of truth: the
    stage modules document why each value was chosen, and where it departs from the paper).

    Attributes
    ----------
    tta : bool
        predict: average the 8 flips of every tile (8x slower).
    tile_shape : tuple of 3 int or None
        predict: tile shape on the model grid (default: chosen automatically).
    halo : int or None
        predict: voxels discarded at tile sides (default: the receptive-field radius).
    batch_size : int or None
        predict: tiles per network call (default: as many as fit ``max_tile_voxels``).
    blend : int
        predict: width (voxels) of the cosine ramp between tiles.
    max_tile_voxels : int
        predict: memory budget, voxels per network call.
    preprocessing : dict or None
        predict: override of the model card's preprocessing for this run (any of
        ``smooth_sigma``, ``normalization``, ``invert``; see
        :func:`cryoves.predict.predict_probability`); None = the card's own.
    large_scale : float or None
        predict: a second, cheaper pass of the network on the tomogram shrunk to this scale
        (0.6: 0.22x the voxels; 2.1-2.3 s against 8.0-8.8 s for the main pass on 160x384x384,
        where 0.75, the default until 2026-12-01, took 4.0 s and found the same vesicles on the
        suites and a development set) proposes vesicles too large for the network at its own
        size (outer radius above ~28 nm with the default weights); each is verified by its
        membrane like a weak segment (:func:`cryoves.threshold.add_weak_segments`) before it
        becomes a segment. ``None``: no such pass. Skipped when a probability map is given.
    large_min_radius_nm : float
        predict, large pass: smallest region (equivalent-sphere radius of ``p > 0.5``) proposed,
        and smallest outer radius accepted.
    large_max_radius_nm : float
        large pass: largest outer radius accepted (synaptic vesicles reach ~32 nm; larger
        round membranes are mostly dense-core vesicles, 33-48 nm in the simulator, and
        endosomes). With 40 nm the default suite gained two false positives that 34 nm does
        not accept (34.4 nm on ``fine-1.0nm``, 21.1 nm on ``distractors-2.0nm``). Default: the
        outlier stage's ``max_radius_nm`` (one size range for every path).
    thresholds : tuple of float or None
        global: candidate thresholds (default 0.80, 0.81, ..., 1.00).
    connectivity : int
        global and adaptive: segment connectivity (1 = 6-connected, 3 = 26-connected).
    min_shell_fraction : float
        global: a candidate threshold competes only when its shell holds at least this
        fraction of the largest candidate shell (0: the paper's rule; see
        :func:`cryoves.threshold.global_threshold`).
    threshold_mode : str
        global: ``"robust"`` (default) adds the vesicles a less confident network marks below
        the global threshold, each verified by its membrane
        (:func:`cryoves.threshold.add_weak_segments`); ``"paper"``: the darkest-shell threshold
        alone.
    low_threshold : float
        global, robust mode: candidates are regions of ``probability >= low_threshold``.
    weak_min_score : float
        global, robust mode: smallest membrane detection score of a rescued vesicle.
    weak_max_radius_nm : float
        global, robust mode: largest outer radius of a rescued vesicle.
    merged_ratio : float or None
        global, rescued and large vesicles: a verified sphere also takes the voxels of a segment
        at least this many times (8) its volume, a blob that merged it with its surroundings
        (see :func:`cryoves.threshold.add_weak_segments`); ``None``: free voxels only.
    adaptive : bool
        Run the adaptive local threshold (else the global segments go straight to refinement).
    segment_min_radius_nm : float
        adaptive: segments smaller than a sphere of this radius are grown, then dropped (a
        segment ends at the membrane centre, ~2-3 nm inside the outer radius; see
        :func:`cryoves.threshold.adaptive_threshold`); robust global mode: smallest radius
        searched for a rescued vesicle, and segments below it count as fragments.
    max_radius_nm : float or None
        outliers: accepted vesicles with a fitted outer radius > this (34 nm) are re-fitted, then
        removed if still larger (dense-core vesicles, endosomes); ``None``: no upper limit.
    min_radius_nm : float
        outliers: accepted vesicles with a fitted outer radius <= this are removed
        (paper/reference: 12 nm).
    z_split, extent_split : float
        adaptive: a segment is split when its volume z-score > ``z_split`` and its extent
        < ``extent_split`` (paper 1 and 0.25).
    extent_range : (float, float)
        adaptive: segments with extent outside are dropped (paper 0.25-0.75).
    grow_min : float
        adaptive: lowest threshold a small segment may be grown to (paper 0.8).
    split_part_min : float
        adaptive: a part split off a merged segment is kept from this fraction (0.5) of the volume
        of a ``segment_min_radius_nm`` sphere on (other segments need all of it; 1 = the paper).
    split_step, split_fine_step : float
        adaptive: coarse and final threshold steps for splitting (paper 0.01, 1e-4).
    max_split_depth : int
        adaptive: how often split parts may be split again.
    refine_max_iter : int
        refine: iterations per vesicle (paper 10).
    box_margin_nm : float or None
        refine: box half-edge minus radius (default: scales with the radius).
    refine_min_radius_nm, refine_max_radius_nm : float
        refine: membrane search window; fits outside are removed.
    bin_width_vox : float
        refine: radial-profile bin width (voxels).
    sigma_vox : float
        refine: smoothing of the profile derivatives (paper: 1 voxel).
    radius_method : str
        refine and outliers: outer-edge definition (``"membrane_centre"``, ``"max_slope"`` or
        ``"second_derivative"``; see :mod:`cryoves.refine`).
    bilayer_nm : float
        refine and outliers: bilayer thickness added as half to the membrane centre by
        ``radius_method="membrane_centre"``.
    capture : bool
        refine: re-centre on the membrane before the iterations (see :mod:`cryoves.refine`).
    outliers : bool
        Run outlier detection and removal.
    p_threshold : float
        outliers: vesicles with Mahalanobis p < this are outliers (default: that of
        :func:`cryoves.outliers.filter_outliers`, which explains why it is not the paper's 0.3;
        pass 0.3 to reproduce the paper).
    outlier_max_iter : int
        outliers: re-fits per outlier with a growing box (paper 10).
    grow_vox : int
        outliers: box edge growth per re-fit (paper 2 voxels).
    remove_overlaps : bool
        outliers: resolve overlapping spheres (reference implementation).
    robust : bool
        outliers: robust mean/covariance (default: plain sample estimates, as the paper).
    keep_score : float or None
        outliers: an atypical vesicle whose membrane scores at least this is kept, not removed
        (see :func:`cryoves.outliers.filter_outliers`); ``None``: the paper's rule.
    keep_score_relative : float or None
        outliers: ``keep_score`` is lowered to this fraction (0.55) of the tomogram's median
        membrane score where that is lower (noisy tomograms); ``None``: ``keep_score`` as given.
    max_rounds : int
        outliers: rounds of p-value recomputation.
    min_coverage : float or None
        outliers: a sphere whose membrane is seen in fewer than this fraction of the directions
        (a tube, a fold, an ellipsoidal compartment) is removed unless a re-fit closes it (see
        :func:`cryoves.outliers.filter_outliers`); ``None``: no such check.
    lumen_deviation : float or None
        outliers: a sphere whose lumen is darker than the median of the tomogram's vesicles by
        more than this (or 5 robust standard deviations), a dense core, is removed unless a re-fit
        brings it back; ``None``: no such check.
    faint_score_relative : float or None
        outliers: a sphere whose membrane scores below this fraction of the tomogram's median
        score *and* whose lumen is lighter than the median lumen by more than ``light_lumen``
        (the end of a tube or of an elongated compartment, seen from inside) is removed unless a
        re-fit brings it back; ``None`` (or 0): no such check.
    light_lumen : float
        outliers: see ``faint_score_relative`` (in units of the membrane's depth).
    features : tuple of str
        outliers: feature columns for the Mahalanobis distance.
    """

    # predict
    tta: bool = _default(_predict.predict_probability, "tta")
    tile_shape: Optional[tuple] = _default(_predict.predict_probability, "tile_shape")
    halo: Optional[int] = _default(_predict.predict_probability, "halo")
    batch_size: Optional[int] = _default(_predict.predict_probability, "batch_size")
    blend: int = _default(_predict.predict_probability, "blend")
    max_tile_voxels: int = _default(_predict.predict_probability, "max_tile_voxels")
    preprocessing: Optional[dict] = _default(_predict.predict_probability, "preprocessing")
    large_scale: Optional[float] = 0.6
    large_min_radius_nm: float = 20.0
    large_max_radius_nm: float = _default(_outliers.filter_outliers, "max_radius_nm")
    # global threshold
    thresholds: Optional[tuple] = _default(_threshold.global_threshold, "thresholds")
    connectivity: int = _default(_threshold.global_threshold, "connectivity")
    min_shell_fraction: float = _default(_threshold.global_threshold, "min_shell_fraction")
    threshold_mode: str = "robust"
    low_threshold: float = _default(_threshold.add_weak_segments, "low_threshold")
    weak_min_score: float = _default(_threshold.add_weak_segments, "min_score")
    weak_max_radius_nm: float = _default(_threshold.add_weak_segments, "max_radius_nm")
    merged_ratio: Optional[float] = _default(_threshold.add_weak_segments, "merged_ratio")
    # adaptive threshold
    adaptive: bool = True
    segment_min_radius_nm: float = _default(_threshold.adaptive_threshold, "min_radius_nm")
    z_split: float = _default(_threshold.adaptive_threshold, "z_split")
    extent_split: float = _default(_threshold.adaptive_threshold, "extent_split")
    extent_range: tuple = _default(_threshold.adaptive_threshold, "extent_range")
    grow_min: float = _default(_threshold.adaptive_threshold, "grow_min")
    split_part_min: float = _default(_threshold.adaptive_threshold, "split_part_min")
    split_step: float = _default(_threshold.adaptive_threshold, "step")
    split_fine_step: float = _default(_threshold.adaptive_threshold, "fine_step")
    max_split_depth: int = _default(_threshold.adaptive_threshold, "max_split_depth")
    # refine
    refine_max_iter: int = _default(_refine.refine_spheres, "max_iter")
    box_margin_nm: Optional[float] = None
    refine_min_radius_nm: float = _default(_refine.refine_spheres, "min_radius_nm")
    refine_max_radius_nm: float = _default(_refine.refine_spheres, "max_radius_nm")
    bin_width_vox: float = _default(_refine.refine_spheres, "bin_width_vox")
    sigma_vox: float = _default(_refine.refine_spheres, "sigma_vox")
    radius_method: str = _default(_refine.refine_spheres, "radius_method")
    capture: bool = _default(_refine.refine_spheres, "capture")
    bilayer_nm: float = _default(_refine.refine_spheres, "bilayer_nm")
    # outliers
    outliers: bool = True
    min_radius_nm: float = _default(_outliers.filter_outliers, "min_radius_nm")
    max_radius_nm: Optional[float] = _default(_outliers.filter_outliers, "max_radius_nm")
    p_threshold: float = _default(_outliers.filter_outliers, "p_threshold")
    outlier_max_iter: int = _default(_outliers.filter_outliers, "max_iter")
    grow_vox: int = _default(_outliers.filter_outliers, "grow_vox")
    remove_overlaps: bool = _default(_outliers.filter_outliers, "remove_overlaps")
    robust: bool = _default(_outliers.filter_outliers, "robust")
    keep_score: Optional[float] = _default(_outliers.filter_outliers, "keep_score")
    keep_score_relative: Optional[float] = _default(_outliers.filter_outliers, "keep_score_relative")
    max_rounds: int = _default(_outliers.filter_outliers, "max_rounds")
    min_coverage: Optional[float] = _default(_outliers.filter_outliers, "min_coverage")
    lumen_deviation: Optional[float] = _default(_outliers.filter_outliers, "lumen_deviation")
    faint_score_relative: Optional[float] = _default(_outliers.filter_outliers, "faint_score_relative")
    light_lumen: float = _default(_outliers.filter_outliers, "light_lumen")
    features: tuple = _default(_outliers.filter_outliers, "features")

    def __post_init__(self) -> None:
        for name in ("tile_shape", "thresholds", "extent_range", "features"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                setattr(self, name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first invalid parameter."""
        if self.large_scale is not None and not (isinstance(self.large_scale, (int, float))
                                                 and 0.25 <= self.large_scale < 1.0):
            raise ValueError(f"SegmentParams.large_scale must be None or in [0.25, 1), got {self.large_scale!r}")
        if not 0 < self.large_min_radius_nm < self.large_max_radius_nm:
            raise ValueError("SegmentParams: need 0 < large_min_radius_nm < large_max_radius_nm, got "
                             f"{self.large_min_radius_nm}, {self.large_max_radius_nm}")
        if self.preprocessing is not None:
            from cryoves.model import PREPROCESSING_KEYS

            if not isinstance(self.preprocessing, dict):
                raise ValueError("SegmentParams.preprocessing must be a dict (or None for the model card's)")
            unknown = sorted(set(self.preprocessing) - set(PREPROCESSING_KEYS))
            if unknown:
                raise ValueError(f"SegmentParams.preprocessing: unknown key(s) {unknown}; "
                                 f"allowed: {list(PREPROCESSING_KEYS)}")
        def pos(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) \
                    or not np.isfinite(v) or (v < 0 if allow_zero else v <= 0):
                raise ValueError(f"SegmentParams.{name} must be a {'non-negative' if allow_zero else 'positive'} "
                                 f"number, got {v!r}")
        def frac(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) \
                    or not 0.0 <= v <= 1.0:
                raise ValueError(f"SegmentParams.{name} must be {'None or ' if allow_none else ''}in [0, 1], "
                                 f"got {v!r}")
        for name in ("min_radius_nm", "segment_min_radius_nm", "weak_max_radius_nm", "refine_min_radius_nm", "refine_max_radius_nm", "bin_width_vox",
                     "sigma_vox", "bilayer_nm", "split_step", "split_fine_step", "max_tile_voxels", "refine_max_iter"):
            pos(name)
        for name in ("blend", "grow_vox", "outlier_max_iter", "max_split_depth", "max_rounds"):
            pos(name, allow_zero=True)
        if not 0.0 <= self.p_threshold <= 1.0:
            raise ValueError(f"SegmentParams.p_threshold must be in [0, 1], got {self.p_threshold}")
        frac("min_shell_fraction")
        frac("split_part_min")
        if self.merged_ratio is not None and not (isinstance(self.merged_ratio, (int, float, np.integer, np.floating))
                                                  and not isinstance(self.merged_ratio, bool)
                                                  and np.isfinite(self.merged_ratio) and self.merged_ratio >= 1):
            raise ValueError(f"SegmentParams.merged_ratio must be None or a number >= 1, got {self.merged_ratio!r}")
        if self.refine_min_radius_nm >= self.refine_max_radius_nm:
            raise ValueError("SegmentParams.refine_min_radius_nm must be below refine_max_radius_nm")
        lo, hi = self.extent_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"SegmentParams.extent_range must satisfy 0 <= lo < hi <= 1, got {self.extent_range}")
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"SegmentParams.connectivity must be 1, 2 or 3, got {self.connectivity}")
        if self.thresholds is not None:
            t = np.asarray(self.thresholds, dtype=float)
            if t.size == 0 or not np.all((t >= 0) & (t <= 1)):
                raise ValueError(f"SegmentParams.thresholds must be values in [0, 1], got {self.thresholds}")
        if self.box_margin_nm is not None:
            pos("box_margin_nm", allow_zero=True)
        if self.max_radius_nm is not None:
            pos("max_radius_nm")
            if self.max_radius_nm <= self.min_radius_nm:
                raise ValueError("SegmentParams.max_radius_nm must be above min_radius_nm")
        frac("min_coverage", allow_none=True)
        if self.lumen_deviation is not None and not (isinstance(self.lumen_deviation, (int, float))
                                                     and np.isfinite(self.lumen_deviation)
                                                     and self.lumen_deviation > 0):
            raise ValueError(f"SegmentParams.lumen_deviation must be None or a positive number, "
                             f"got {self.lumen_deviation!r}")
        frac("faint_score_relative", allow_none=True)
        frac("keep_score_relative", allow_none=True)
        pos("light_lumen", allow_zero=True)
        if self.keep_score is not None and not np.isfinite(self.keep_score):
            raise ValueError(f"SegmentParams.keep_score must be a finite number or None, got {self.keep_score}")
        if self.radius_method not in _refine.RADIUS_METHODS:
            raise ValueError(f"SegmentParams.radius_method must be one of {_refine.RADIUS_METHODS}, "
                             f"got {self.radius_method!r}")
        if self.threshold_mode not in _threshold.THRESHOLD_MODES:
            raise ValueError(f"SegmentParams.threshold_mode must be one of {_threshold.THRESHOLD_MODES}, "
                             f"got {self.threshold_mode!r}")
        if not 0.0 < self.low_threshold <= 1.0:
            raise ValueError(f"SegmentParams.low_threshold must be in (0, 1], got {self.low_threshold}")
        if not np.isfinite(self.weak_min_score):
            raise ValueError(f"SegmentParams.weak_min_score must be a finite number, got {self.weak_min_score}")
        if self.segment_min_radius_nm >= self.weak_max_radius_nm:
            raise ValueError("SegmentParams.segment_min_radius_nm must be below weak_max_radius_nm")

    def stage_kwargs(self, stage: str, voxel_size: float) -> dict:
        """Keyword arguments of one stage function, from these parameters (the one mapping).

        Parameters
        ----------
        stage : {"predict", "large", "global", "weak", "large_weak", "adaptive", "refine", "outliers"}
            ``"predict"``: :func:`cryoves.predict.predict_probability`; ``"global"``:
            :func:`cryoves.threshold.global_threshold`; ``"weak"``:
            :func:`cryoves.threshold.add_weak_segments` (robust mode of the global stage);
            ``"adaptive"``: :func:`cryoves.threshold.adaptive_threshold`; ``"refine"``:
            :func:`cryoves.refine.refine_spheres`; ``"outliers"``:
            :func:`cryoves.outliers.filter_outliers`; ``"large"`` and ``"large_weak"``: the
            large-vesicle pass (``predict_probability`` at ``large_scale``, then
            ``add_weak_segments`` on its large regions).
        voxel_size : float
            nm (converts the nm parameters that a stage takes in voxels).

        Returns
        -------
        dict
            Every tunable keyword of that function (the data arguments, ``mask``,
            ``normalization`` and ``progress`` are the caller's).
        """
        vs = check_voxel_size(voxel_size)
        if stage == "predict":
            return dict(tile_shape=self.tile_shape, halo=self.halo, batch_size=self.batch_size, tta=self.tta,
                        blend=self.blend, max_tile_voxels=self.max_tile_voxels,
                        preprocessing=None if self.preprocessing is None else dict(self.preprocessing))
        if stage == "large":
            if self.large_scale is None:
                raise ValueError("SegmentParams.large_scale is None: no large-vesicle pass")
            return dict(self.stage_kwargs("predict", vs), scale=self.large_scale,
                        min_region_radius_nm=self.large_min_radius_nm)
        if stage == "large_weak":
            return dict(self.stage_kwargs("weak", vs), low_threshold=0.5, min_radius_nm=self.large_min_radius_nm,
                        max_radius_nm=self.large_max_radius_nm, min_weak_fraction=0.0, fragment_radius_nm=0.0)
        if stage == "global":
            return dict(thresholds=self.thresholds, connectivity=self.connectivity,
                        min_shell_fraction=self.min_shell_fraction)
        if stage == "weak":
            return dict(low_threshold=self.low_threshold, min_radius_nm=self.segment_min_radius_nm,
                        max_radius_nm=self.weak_max_radius_nm, min_score=self.weak_min_score,
                        merged_ratio=self.merged_ratio, connectivity=self.connectivity)
        if stage == "adaptive":
            return dict(min_radius_nm=self.segment_min_radius_nm, z_split=self.z_split,
                        extent_split=self.extent_split, extent_range=self.extent_range, grow_min=self.grow_min,
                        split_part_min=self.split_part_min, step=self.split_step, fine_step=self.split_fine_step,
                        connectivity=self.connectivity, max_split_depth=self.max_split_depth)
        if stage == "refine":
            return dict(max_iter=self.refine_max_iter,
                        box_margin_vox=None if self.box_margin_nm is None else self.box_margin_nm / vs,
                        min_radius_nm=self.refine_min_radius_nm, max_radius_nm=self.refine_max_radius_nm,
                        bin_width_vox=self.bin_width_vox, sigma_vox=self.sigma_vox,
                        radius_method=self.radius_method, capture=self.capture, bilayer_nm=self.bilayer_nm)
        if stage == "outliers":
            return dict(p_threshold=self.p_threshold, max_iter=self.outlier_max_iter, grow_vox=self.grow_vox,
                        remove_overlaps=self.remove_overlaps, min_radius_nm=self.min_radius_nm,
                        max_radius_nm=self.max_radius_nm,
                        features=self.features, robust=self.robust, max_rounds=self.max_rounds,
                        radius_method=self.radius_method, bilayer_nm=self.bilayer_nm, keep_score=self.keep_score,
                        keep_score_relative=self.keep_score_relative,
                        min_coverage=self.min_coverage, lumen_deviation=self.lumen_deviation,
                        faint_score_relative=self.faint_score_relative, light_lumen=self.light_lumen)
        raise ValueError(f"unknown stage {stage!r}; choose one of "
                         f"{STAGES[:1] + ('large',) + STAGES[1:2] + ('weak', 'large_weak') + STAGES[2:]}")

    def for_min_radius(self, min_radius_nm: float) -> "SegmentParams":
        """A copy that looks for vesicles from outer radius ``min_radius_nm`` (nm) on.

        The smallest vesicle size is two rules: the outlier stage removes fitted outer radii up
        to ``min_radius_nm``, and the adaptive stage drops segments smaller than a sphere of
        ``segment_min_radius_nm`` (a segment ends at the membrane centre, so 2 nm less by
        default: 12 and 10 nm). Both move together here, by the same amount, so that smaller
        vesicles are not dropped as segments before their radius is fitted (the paper's 12 nm
        rule is ``min_radius_nm=12``). Raises ValueError for a size the rules cannot take.
        """
        r = float(min_radius_nm)
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"SegmentParams.min_radius_nm must be a positive, finite number of nm, got {min_radius_nm}")
        seg = self.segment_min_radius_nm + (r - self.min_radius_nm)
        if not seg > 0:
            raise ValueError(f"SegmentParams.min_radius_nm {r:g} nm is too small: the segment size rule would be "
                             f"{seg:g} nm (min_radius_nm - {self.min_radius_nm - self.segment_min_radius_nm:g})")
        return self.replace(min_radius_nm=r, segment_min_radius_nm=seg)

    def replace(self, **changes) -> "SegmentParams":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown SegmentParams field(s) {sorted(unknown)}")
        d = asdict(self)
        d.update(changes)
        return SegmentParams(**d)

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable: tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentParams":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SegmentParams field(s) {sorted(unknown)}")
        return cls(**d)


@dataclass
class SegmentationResult:
    """Result of :func:`segment`.

    Attributes
    ----------
    table : VesicleTable
        Every vesicle that reached refinement, including removed rows (``status="removed"``
        with a ``note``); the accepted rows are the result.
    labels : ndarray of uint16
        Accepted vesicles rendered as filled spheres (label = table id).
    probability : ndarray of float32
        The U-Net probability map on the tomogram's grid (or the one passed in).
    stage_labels : dict of str to ndarray
        ``"global"``, ``"adaptive"`` (segments, int32), ``"refine"``, ``"outliers"`` (spheres of
        the accepted rows after that stage, uint16). Empty with ``keep_intermediates=False``.
    stage_tables : dict of str to VesicleTable
        The table after ``"refine"`` and after ``"outliers"``.
    threshold : float
        The global threshold chosen (NaN if the global stage found nothing to choose from).
    timings : dict of str to float
        Seconds per stage (``"predict"`` is 0 when a probability was given) and ``"total"``.
    params : SegmentParams
    voxel_size : float
        nm.
    warnings : list of str
        What :func:`cryoves.validate.check_result` found implausible (inverted contrast,
        centres outside the volume, radii out of range), one line each; empty when none.
    large_probability : ndarray of float32 or None
        The large-vesicle pass's map (computed, or the one passed in); ``None`` without one or
        with ``keep_intermediates=False``.
    prediction : dict
        Where the network ran: ``{"process": "main"}`` (this process), or ``"child"`` with the
        child's ``device``, ``precision`` and ``weights`` (see :func:`predict_in_child`).
    """

    table: VesicleTable
    labels: np.ndarray
    probability: np.ndarray
    stage_labels: dict = field(default_factory=dict)
    stage_tables: dict = field(default_factory=dict)
    threshold: float = float("nan")
    timings: dict = field(default_factory=dict)
    params: SegmentParams = field(default_factory=SegmentParams)
    voxel_size: float = float("nan")
    warnings: list = field(default_factory=list)
    large_probability: Optional[np.ndarray] = None
    prediction: dict = field(default_factory=lambda: {"process": "main"})

    @property
    def n_accepted(self) -> int:
        return int(np.sum(self.table["status"] == "accepted"))

    @property
    def n_removed(self) -> int:
        return int(np.sum(self.table["status"] == "removed"))

    def removed_by_stage(self) -> dict[str, int]:
        """Number of removed rows per stage that removed them."""
        rem = self.table["status"] == "removed"
        stages, counts = np.unique(self.table["stage"][rem], return_counts=True)
        return {str(s): int(c) for s, c in zip(stages, counts)}

    def summary(self) -> str:
        """A few lines for people: counts, threshold, time per stage."""
        lines = [f"{self.n_accepted} vesicles accepted, {self.n_removed} removed"
                 + (f" ({', '.join(f'{n} by {s}' for s, n in self.removed_by_stage().items())})"
                    if self.n_removed else ""),
                 f"global threshold {self.threshold:.2f}" if np.isfinite(self.threshold) else "no global threshold",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())]
        return "\n".join(lines)


class _StageProgress:
    """Forward a stage module's progress under the pipeline's stage name."""

    def __init__(self, progress: ProgressCallback, name: str):
        self.progress, self.name = progress, name
        self.last_total = 1

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.last_total = max(int(total), 1)
        report(self.progress, self.name, done, total)

    def finish(self) -> None:
        report(self.progress, self.name, self.last_total, self.last_total)


def _check_mask(mask, shape) -> Optional[np.ndarray]:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} differs from the tomogram's {tuple(shape)}; the region "
                         f"mask must be on the tomogram's grid")
    mask = mask != 0
    if not mask.any():
        raise ValueError("the region mask is empty (no non-zero voxel): nothing to search")
    return mask


def _check_probability(probability, shape, name: str = "probability") -> np.ndarray:
    p = np.asarray(probability)
    if p.shape != tuple(shape):
        raise ValueError(f"{name} shape {p.shape} differs from the tomogram's {tuple(shape)}")
    if p.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be real numbers, got {p.dtype}")
    p = p.astype(np.float32, copy=False)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got [{p.min():g}, {p.max():g}]")
    return p


def _centres_inside(table: VesicleTable, mask: np.ndarray) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(0, bool)
    c = np.rint(table.centers)
    ok = np.all(np.isfinite(c), axis=1)
    idx = np.zeros((len(table), 3), dtype=np.intp)
    idx[ok] = c[ok].astype(np.intp)
    ok &= np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
    inside = np.zeros(len(table), bool)
    inside[ok] = mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return inside


def _drop_segments_outside(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero the segments whose centroid (rounded to a voxel) lies outside ``mask``."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    lv = flat[nz].astype(np.intp)
    cnt = np.bincount(lv, minlength=n + 1).astype(np.float64)
    coords = np.unravel_index(nz, labels.shape)
    cen = np.stack([np.bincount(lv, c, minlength=n + 1) for c in coords], axis=1) / np.maximum(cnt, 1)[:, None]
    c = np.clip(np.rint(cen).astype(np.intp), 0, np.array(labels.shape) - 1)
    keep = (cnt > 0) & mask[c[:, 0], c[:, 1], c[:, 2]]
    keep[0] = True
    if keep.all():
        return labels
    out = labels.copy()
    out[~keep[labels]] = 0
    return out


def _remove_outside(table: VesicleTable, mask: np.ndarray, stage: str) -> VesicleTable:
    out = table.copy()
    drop = (out["status"] == "accepted") & ~_centres_inside(out, mask)
    if drop.any():
        status, note, stg = out["status"].copy(), out["note"].copy(), out["stage"].copy()
        status[drop] = "removed"
        note[drop] = "centre outside region mask"
        stg[drop] = stage
        out["status"], out["note"], out["stage"] = status, note, stg
    return out


def _release_pages(*arrays) -> None:
    """:func:`cryoves.io.release_pages` of each memory-mapped array (others and None: nothing)."""
    for a in arrays:
        if a is not None:
            release_pages(a)


def _stage_params(params) -> SegmentParams:
    params = SegmentParams() if params is None else params
    if not isinstance(params, SegmentParams):
        raise TypeError(f"params must be a SegmentParams, got {type(params).__name__}")
    return params


def _stage_start(stage: str, params, voxel_size, progress) -> tuple[SegmentParams, float, _StageProgress]:
    """What every stage function starts with: its parameters (default ``SegmentParams()``),
    the voxel size checked, and its progress reporter."""
    return _stage_params(params), check_voxel_size(voxel_size), _StageProgress(progress, stage)


# -- the stages, one public function each: segment() composes them, the napari stage widgets call
# -- them one by one (so a stage-by-stage run and a one-button run give the same result) ----------

def predict_stage(tomogram, voxel_size: float, model=None, params: SegmentParams | None = None, *,
                  progress: ProgressCallback = None, process: str = "main",
                  workdir=None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Stage ``"predict"``: the probability map and the large-vesicle pass's map.

    With ``process="child"`` both passes run in a child process (:func:`predict_in_child`),
    which returns the maps as memory-mapped files and exits, so that the memory TensorFlow
    keeps after a prediction is returned before the post-processing; ``"auto"``: so for
    volumes of at least :data:`CHILD_PROCESS_VOXELS` voxels when ``model`` is a weights path
    or ``None`` (no network loaded in this process), else here.

    Parameters
    ----------
    tomogram : ndarray, shape (Z, Y, X)
        Not modified.
    voxel_size : float
        nm.
    model : UNetModel or str or Path, optional
        As in :func:`segment`.
    params : SegmentParams, optional
        ``stage_kwargs("predict")``; ``stage_kwargs("large")`` for the second pass.
    progress : callable, optional
        ``progress("predict", done, total)``.
    process : {"main", "child", "auto"}
        Where the network runs: here (default), in a child process, or chosen by size.
    workdir : str or Path, optional
        With a child process: the folder for its temporary files (default: the system's).

    Returns
    -------
    probability : ndarray of float32
        :func:`cryoves.predict.predict_probability` at the model's scale (a read-only
        memory-mapped array when computed in a child process).
    large : ndarray of float32 or None
        The pass at ``params.large_scale`` restricted to its large regions (0 elsewhere), to
        be handed to :func:`global_stage`; ``None`` when ``params.large_scale`` is ``None``.
    """
    from cryoves.predict import predict_probability

    if _use_child(process, tomogram, model):
        return predict_in_child(tomogram, voxel_size, model, params, progress=progress, workdir=workdir)
    params, vs, sp = _stage_start("predict", params, voxel_size, progress)
    probability = predict_probability(tomogram, vs, model, progress=sp, **params.stage_kwargs("predict", vs))
    large = None
    if params.large_scale is not None:
        large = predict_probability(tomogram, vs, model, progress=sp, **params.stage_kwargs("large", vs))
    sp.finish()
    return probability, large


#: Where :func:`predict_stage` runs the network: ``"main"`` (this process), ``"child"`` (a child
#: process, :func:`predict_in_child`) or ``"auto"`` (a child for volumes of at least
#: :data:`CHILD_PROCESS_VOXELS` voxels when no network is loaded here).
PREDICTION_PROCESSES = ("main", "child", "auto")
#: ``process="auto"`` predicts volumes of at least this many voxels in a child process: those
#: whose prediction is streamed from the (memory-mapped) input (:data:`cryoves.predict.STREAM_VOXELS`,
#: 64 Mi voxels, e.g. 300x1000x1000 but not 200x512x512), where the ~2.5 GB that TensorFlow keeps
#: after a prediction matter; below it, starting a second Python (~2-3 s) is not worth it.
CHILD_PROCESS_VOXELS = _predict.STREAM_VOXELS


def _use_child(process: str, tomogram, model) -> bool:
    """Whether :func:`predict_stage` runs the network in a child process."""
    if process not in PREDICTION_PROCESSES:
        raise ValueError(f"process must be one of {PREDICTION_PROCESSES}, got {process!r}")
    if process != "auto":
        return process == "child"
    from cryoves.model import UNetModel

    if isinstance(model, UNetModel):  # a network loaded here: TensorFlow is here already
        return False
    return int(np.prod(np.shape(tomogram))) >= CHILD_PROCESS_VOXELS


def _weights_of(model) -> Optional[str]:
    """The weights path a child process loads for ``model`` (None: the default weights)."""
    from cryoves.model import UNetModel

    if isinstance(model, UNetModel):
        if model.path is None:
            raise ValueError("this UNetModel has no weights file (UNetModel.path is None), so a child process "
                             "cannot load it; save it first or predict in this process (process='main')")
        return str(model.path)
    if model is None or isinstance(model, (str, os.PathLike)):
        return None if model is None else str(model)
    raise TypeError("model must be a cryoves.model.UNetModel, a path to weights, or None for the default "
                    f"weights; got {type(model).__name__}")


#: Exceptions of the child process raised again as themselves in the parent (others: RuntimeError).
_CHILD_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FileNotFoundError, PermissionError, OSError,
                                         MemoryError, ImportError, KeyError)}


def predict_in_child(tomogram, voxel_size: float, model=None, params: SegmentParams | None = None, *,
                     progress: ProgressCallback = None, workdir=None,
                     info: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """:func:`predict_stage` in a child process: the same maps, without TensorFlow's memory here.

    TensorFlow's CPU allocator keeps much of the memory of a prediction until the process ends
    (~2.5 GB after a 300x1000x1000 tomogram). Here a child process (``multiprocessing``,
    "spawn") loads the network, runs both passes and writes the maps on the model's grid into
    files in a temporary folder, then exits; this process maps them, resamples them to the
    tomogram's grid (:func:`cryoves.predict.to_input_grid`, the same numbers as
    :func:`cryoves.predict.predict_probability`) and deletes the folder (the maps stay
    readable while mapped; their pages live in the operating system's file cache). The child
    runs the large-vesicle pass first, so that its resampled copy of the tomogram is made before
    TensorFlow holds the memory of a prediction.

    Parameters
    ----------
    tomogram : ndarray, shape (Z, Y, X)
        A memory-mapped array is read by the child from its file; any other array is first
        written to the temporary folder. Not modified.
    voxel_size : float
        nm.
    model : UNetModel or str or Path, optional
        The child loads the weights file (``UNetModel.path`` for a model; ``None``: the default
        weights).
    params : SegmentParams, optional
    progress : callable, optional
        ``progress("predict", done, total)``, forwarded from the child. Raise
        :class:`cryoves.Cancelled` from it to stop: the child is killed.
    workdir : str or Path, optional
        Folder for the temporary files (default: the system's temporary folder); nothing is
        left there, also on errors, cancellation or Ctrl+C.
    info : dict, optional
        Filled with ``device``, ``precision`` and ``weights`` of the child's network.

    Returns
    -------
    probability, large : read-only memory-mapped float32 arrays (``large`` None without a large pass)

    Raises
    ------
    ValueError, TypeError, OSError, ...
        An error in the child is raised again with its type and message (its traceback in the
        exception's notes); other errors, and a child that dies (e.g. killed for memory), as
        :class:`ChildProcessError` (an :class:`OSError`) naming the error or the exit status.
    cryoves.Cancelled
        If the progress callback raises it.
    """
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from multiprocessing.connection import Connection
    from pathlib import Path

    params, vs, sp = _stage_start("predict", params, voxel_size, progress)
    weights = _weights_of(model)
    if not hasattr(tomogram, "shape") or not hasattr(tomogram, "dtype"):
        tomogram = np.asarray(tomogram)
    if tomogram.ndim != 3:
        raise ValueError(f"tomogram must be a 3-D (Z, Y, X) array, got shape {tuple(tomogram.shape)}")
    shape = tuple(int(n) for n in tomogram.shape)
    tmp = Path(tempfile.mkdtemp(prefix="cryoves-predict-", dir=None if workdir is None else str(workdir)))
    proc = receiver = None
    try:
        source = memmap_source(tomogram)
        if source is None:  # an array in memory: the child reads it from a file
            path = tmp / "tomogram.raw"
            arr = tomogram if isinstance(tomogram, np.ndarray) else np.asarray(tomogram)
            step = max(1, _predict._SLAB_VOXELS // max(1, shape[1] * shape[2]))
            with open(path, "wb") as fh:
                for z0 in range(0, shape[0], step):
                    np.ascontiguousarray(arr[z0:z0 + step]).tofile(fh)
            source = (str(path), arr.dtype.str, 0, shape)
        job = tmp / "job.json"
        job.write_text(json.dumps({"source": list(source), "voxel_size": vs, "weights": weights,
                                   "params": params.to_dict(), "tmp": str(tmp), "parent": os.getpid()}))
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)  # the child imports this very cryoves
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen([sys.executable, "-c", "import sys; from cryoves.pipeline import _child_predict; "
                                     "_child_predict(sys.argv[1], int(sys.argv[2]))", str(job), str(write_fd)],
                                    pass_fds=(write_fd,), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(write_fd)
        receiver = Connection(read_fd, writable=False)
        result = None
        while result is None:
            if receiver.poll(0.1):
                try:
                    msg = receiver.recv()
                except EOFError:
                    break  # the child ended without a word
                if msg[0] == "progress":
                    sp(*msg[1:])
                elif msg[0] == "done":
                    result = msg[1]
                else:  # ("error", type name, message, traceback)
                    proc.wait()
                    kind = _CHILD_ERRORS.get(msg[1])
                    err = (kind(msg[2]) if kind is not None
                           else ChildProcessError(f"the prediction failed in its child process: {msg[1]}: {msg[2]}"))
                    err.add_note(f"in the prediction's child process:\n{msg[3]}")
                    raise err
            elif proc.poll() is not None and not receiver.poll(0):
                break
        receiver.close()
        proc.wait()
        if result is None:
            code = proc.returncode
            how = (f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}")
            raise ChildProcessError(f"the prediction's child process {how} before it finished"
                                    + (" (out of memory?)" if code == -9 else ""))
        if info is not None:
            info.update(result["info"])
        maps = []
        for name, model_shape in (("probability", result["probability_shape"]), ("large", result["large_shape"])):
            if model_shape is None:
                maps.append(None)
                continue
            src = tmp / f"{name}_model.f32"
            if tuple(model_shape) == shape:  # clipped in place
                final = src
                m = np.memmap(src, dtype=np.float32, mode="r+", shape=shape)
                _predict.to_input_grid(m, shape, out=m)
            else:
                final = tmp / f"{name}.f32"
                m = np.memmap(final, dtype=np.float32, mode="w+", shape=shape)
                _predict.to_input_grid(np.memmap(src, dtype=np.float32, mode="r", shape=tuple(model_shape)),
                                       shape, out=m)
            m.flush()
            del m
            maps.append(np.memmap(final, dtype=np.float32, mode="r", shape=shape))
        sp.finish()
        return maps[0], maps[1]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if receiver is not None and not receiver.closed:
            receiver.close()
        shutil.rmtree(tmp, ignore_errors=True)  # mapped files stay readable until unmapped


def _child_predict(job_path: str, fd: int) -> None:
    """The child process of :func:`predict_in_child`: runs the job in ``job_path``, reports on pipe ``fd``."""
    import json
    import shutil
    import signal
    import traceback
    from multiprocessing.connection import Connection
    from pathlib import Path

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C: the parent stops this process
    conn = Connection(fd, readable=False)
    try:
        job = json.loads(Path(job_path).read_text())
        source, voxel_size, weights = job["source"], job["voxel_size"], job["weights"]
        params_dict, tmp, parent_pid = job["params"], Path(job["tmp"]), int(job["parent"])
        from cryoves.predict import _predict_on_model_grid

        def progress(stage, done, total):
            if os.getppid() != parent_pid:  # the parent is gone: clean up and stop
                shutil.rmtree(tmp, ignore_errors=True)
                os._exit(3)
            conn.send(("progress", stage, int(done), int(total)))

        path, dtype, offset, shape = source
        tomogram = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
        from cryoves._tf import compute_device
        from cryoves.model import get_model, inference_precision

        model = get_model(weights)
        params = SegmentParams.from_dict(params_dict)
        vs = float(voxel_size)
        out = {"info": {"device": compute_device(), "precision": inference_precision(),
                        "weights": str(model.path or model.card.name)},
               "probability_shape": None, "large_shape": None}
        kw = dict(scale=1.0, min_region_radius_nm=None)
        if params.large_scale is not None:  # first: its resampled tomogram before TensorFlow's retained memory
            large, _ = _predict_on_model_grid(tomogram, vs, model, progress=progress,
                                              **{**kw, **params.stage_kwargs("large", vs)})
            large.tofile(tmp / "large_model.f32")
            out["large_shape"] = tuple(large.shape)
            del large
        card = model.card
        model_shape = _predict.model_grid_shape(tomogram.shape, vs, card.voxel_size_nm)
        path = tmp / "probability_model.f32"
        target = np.memmap(path, dtype=np.float32, mode="w+", shape=model_shape)  # zeros: blended into
        prob, _ = _predict_on_model_grid(tomogram, vs, model, progress=progress, out=target,
                                         **{**kw, **params.stage_kwargs("predict", vs)})
        if prob is not target:  # resampled: a map in memory
            prob.tofile(path)
        target.flush()
        out["probability_shape"] = tuple(prob.shape)
        del prob, target
        conn.send(("done", out))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        text = str(err).strip() or type(err).__name__
        conn.send(("error", type(err).__name__, text, traceback.format_exc()))
        conn.close()
        raise SystemExit(1)
    conn.close()


def global_stage(tomogram, probability, voxel_size: float, params: SegmentParams | None = None, *,
                 large=None, mask=None, normalization=None, labels_out=None, progress: ProgressCallback = None):
    """Stage ``"global"``: the darkest-shell threshold, the weak segments, the large vesicles.

    :func:`cryoves.threshold.global_threshold`; then, with ``threshold_mode="robust"``,
    :func:`cryoves.threshold.add_weak_segments` on ``probability``; then, when ``large`` is
    given, ``add_weak_segments`` on it with ``stage_kwargs("large_weak")`` (large vesicles,
    each verified by its membrane).

    Parameters
    ----------
    tomogram, probability : ndarray, shape (Z, Y, X)
        Not modified.
    voxel_size : float
        nm.
    params : SegmentParams, optional
        ``thresholds`` (a single value: the global threshold is that value) and the other
        parameters of the stage.
    large : ndarray, optional
        The second map of :func:`predict_stage`; ``None``: no large-vesicle candidates.
    mask : ndarray of bool, optional
        Region mask (see :func:`segment`).
    normalization : (offset, scale), optional
        :func:`cryoves.refine.intensity_normalization` of ``tomogram`` (computed if not given).
    labels_out : ndarray of int32, optional
        Where the labels are written (``out`` of :func:`cryoves.threshold.global_threshold`).
    progress : callable, optional
        ``progress("global", done, total)``.

    Returns
    -------
    GlobalThresholdResult
        That of :func:`cryoves.threshold.global_threshold`, its ``labels`` holding the added
        segments too.
    """
    from cryoves.refine import intensity_normalization
    from cryoves.threshold import add_weak_segments, global_threshold

    params, vs, sp = _stage_start("global", params, voxel_size, progress)
    g = global_threshold(tomogram, probability, mask=mask, out=labels_out, progress=sp,
                         **params.stage_kwargs("global", vs))
    if params.threshold_mode == "robust" or large is not None:
        if normalization is None:
            normalization = intensity_normalization(tomogram)
        # g.labels is this stage's own (made by global_threshold above): updated in place
        if params.threshold_mode == "robust":
            g.labels = add_weak_segments(tomogram, probability, g.labels, vs, mask=mask, normalization=normalization,
                                         overwrite_labels=True, progress=sp, **params.stage_kwargs("weak", vs))
        if large is not None:
            # vesicles too large for the network at its own size, each verified by its membrane
            g.labels = add_weak_segments(tomogram, large, g.labels, vs, mask=mask, normalization=normalization,
                                         overwrite_labels=True, progress=sp, **params.stage_kwargs("large_weak", vs))
    sp.finish()
    return g


def adaptive_stage(probability, labels, threshold: float, voxel_size: float, params: SegmentParams | None = None,
                   *, mask=None, overwrite_labels: bool = False, progress: ProgressCallback = None) -> np.ndarray:
    """Stage ``"adaptive"``: :func:`cryoves.threshold.adaptive_threshold` (if ``params.adaptive``).

    Parameters
    ----------
    probability, labels : ndarray, shape (Z, Y, X)
        The map and the labels of :func:`global_stage`. Not modified (``labels``: unless
        ``overwrite_labels``).
    threshold : float
        The global threshold.
    voxel_size : float
        nm.
    params : SegmentParams, optional
    mask : ndarray of bool, optional
        Segments whose centroid lies outside are dropped.
    overwrite_labels : bool
        The caller gives ``labels`` up: the stage may work in it (one label volume less).
    progress : callable, optional
        ``progress("adaptive", done, total)``.

    Returns
    -------
    ndarray
        The segments (``labels`` itself when there is nothing to do).
    """
    from cryoves.threshold import adaptive_threshold

    params, vs, sp = _stage_start("adaptive", params, voxel_size, progress)
    if params.adaptive and labels.max() > 0:
        labels = adaptive_threshold(probability, labels, threshold, vs, overwrite_labels=overwrite_labels,
                                    progress=sp,
                                    **params.stage_kwargs("adaptive", vs))
    if mask is not None:
        labels = _drop_segments_outside(labels, mask)
    sp.finish()
    return labels


def refine_stage(tomogram, labels, voxel_size: float, params: SegmentParams | None = None, *, mask=None,
                 normalization=None, progress: ProgressCallback = None) -> VesicleTable:
    """Stage ``"refine"``: :func:`cryoves.refine.refine_spheres` on the segments.

    Parameters
    ----------
    tomogram, labels : ndarray, shape (Z, Y, X)
        Not modified.
    voxel_size : float
        nm.
    params : SegmentParams, optional
    mask : ndarray of bool, optional
        Rows whose centre lies outside are marked removed.
    normalization : (offset, scale), optional
        As in :func:`global_stage`.
    progress : callable, optional
        ``progress("refine", done, total)``.

    Returns
    -------
    VesicleTable
    """
    from cryoves.refine import refine_spheres

    params, vs, sp = _stage_start("refine", params, voxel_size, progress)
    table = refine_spheres(tomogram, labels, vs, normalization=normalization, progress=sp,
                           **params.stage_kwargs("refine", vs))
    sp.finish()
    if mask is not None:
        table = _remove_outside(table, mask, "refine")
    return table


def outliers_stage(tomogram, table: VesicleTable, voxel_size: float, params: SegmentParams | None = None, *,
                   mask=None, normalization=None, progress: ProgressCallback = None) -> VesicleTable:
    """Stage ``"outliers"``: :func:`cryoves.outliers.filter_outliers` (if ``params.outliers``).

    Parameters
    ----------
    tomogram : ndarray, shape (Z, Y, X)
        Not modified.
    table : VesicleTable
        That of :func:`refine_stage`. Not modified.
    voxel_size : float
        nm.
    params : SegmentParams, optional
    mask : ndarray of bool, optional
        Rows whose centre moved outside are marked removed.
    normalization : (offset, scale), optional
        As in :func:`global_stage`.
    progress : callable, optional
        ``progress("outliers", done, total)``.

    Returns
    -------
    VesicleTable
    """
    from cryoves.outliers import filter_outliers

    params, vs, sp = _stage_start("outliers", params, voxel_size, progress)
    if params.outliers and len(table):
        table = filter_outliers(tomogram, table, vs, normalization=normalization, progress=sp,
                                **params.stage_kwargs("outliers", vs))
        if mask is not None:
            table = _remove_outside(table, mask, "outliers")
    sp.finish()
    return table


def segment(tomogram, voxel_size: float, model=None, *, params: SegmentParams | None = None, mask=None,
            probability=None, large_probability=None, keep_intermediates: bool = True,
            progress: ProgressCallback = None, prediction_process: str = "main",
            workdir=None) -> SegmentationResult:
    """Find the synaptic vesicles of a tomogram and fit each as a sphere.

    Runs :func:`predict_stage`, :func:`global_stage`, :func:`adaptive_stage`,
    :func:`refine_stage` and :func:`outliers_stage` in order (the napari stage widgets call the
    same functions one by one).

    Parameters
    ----------
    tomogram : ndarray, shape (Z, Y, X)
        The tomogram (membranes dark), e.g. from :func:`cryoves.io.read_tomogram`
        (memory-mapped arrays are fine). Not modified.
    voxel_size : float
        Voxel size in nm.
    model : UNetModel or str or Path, optional
        The network (or a weights path for :func:`cryoves.model.load_model`); ``None``: the
        default shipped weights. Unused when ``probability`` is given.
    params : SegmentParams, optional
        Every stage parameter (default: :class:`SegmentParams()`).
    mask : ndarray, optional
        Region mask on the tomogram's grid (non-zero = inside); restricts the search (see
        module docstring).
    probability : ndarray, optional
        A probability map on the tomogram's grid; prediction (and with it the large-vesicle
        pass) is skipped.
    large_probability : ndarray, optional
        With ``probability``: the large-vesicle pass's map of the same prediction (the second
        map of :func:`predict_stage`, e.g. kept from an earlier run), so that a reused
        prediction gives the result of a run with the network. Without it, a given
        ``probability`` has no large-vesicle candidates.
    keep_intermediates : bool
        Keep the per-stage label volumes in ``stage_labels`` and the large-vesicle map in
        ``large_probability`` (memory: one volume each).
    progress : callable, optional
        ``progress(stage, done, total)`` with ``stage`` one of :data:`STAGES`. Raise
        :class:`cryoves.Cancelled` from it to stop.
    prediction_process : {"main", "child", "auto"}
        Where the network runs (see :func:`predict_stage`): ``"child"`` returns TensorFlow's
        memory before the post-processing (:func:`predict_in_child`); ``"auto"`` does so for
        volumes of at least :data:`CHILD_PROCESS_VOXELS` voxels when ``model`` is not a loaded
        :class:`~cryoves.model.UNetModel` (``cryoves segment`` uses ``"auto"``).
    workdir : str or Path, optional
        With a child process: the folder for its temporary files.

    Returns
    -------
    SegmentationResult

    Raises
    ------
    ValueError
        Bad inputs (shape, voxel size, mask, probability), checked by
        :func:`cryoves.validate.check_inputs` before any heavy work. Warnings: an
        :class:`~cryoves.validate.InputWarning` for a volume thinner than the network's field of
        view, a :class:`~cryoves.validate.ResultWarning` for an implausible result
        (:func:`cryoves.validate.check_result`: inverted contrast, centres outside, radii).
    FileNotFoundError
        ``model=None`` and no default weights ship (pass weights explicitly).
    cryoves.Cancelled
        If the progress callback raises it.
    """
    from cryoves.refine import intensity_normalization

    params = _stage_params(params)
    params.validate()
    check_inputs(tomogram, voxel_size, params=params, model=model, predict=probability is None, warn=True)
    # memory-mapped volumes (the tomogram, maps from a child process): the pages a stage read are
    # dropped from this process after it (they stay in the file cache), here and after every stage
    release_pages(tomogram)
    if not hasattr(tomogram, "shape") or not hasattr(tomogram, "dtype"):
        tomogram = np.asarray(tomogram)
    if tomogram.ndim != 3:
        raise ValueError(f"tomogram must be a 3-D (Z, Y, X) array, got shape {tuple(tomogram.shape)}")
    vs = check_voxel_size(voxel_size)
    shape = tuple(int(s) for s in tomogram.shape)
    mask = _check_mask(mask, shape)
    timings: dict[str, float] = {}
    stage_labels: dict[str, np.ndarray] = {}
    stage_tables: dict[str, VesicleTable] = {}
    t_all = time.perf_counter()

    # 1. predict ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    large = None  # the large-vesicle pass's regions (SegmentParams.large_scale)
    prediction = {"process": "main"}
    warm_labels = None
    if probability is None:
        if large_probability is not None:
            raise ValueError("large_probability is used only with probability (a map of the same prediction); "
                             "without probability the network computes both")
        if _use_child(prediction_process, tomogram, model):
            prediction = {"process": "child"}
            probability, large = predict_in_child(tomogram, vs, model, params, progress=progress, workdir=workdir,
                                                  info=prediction)
        else:
            # the global threshold's label volume, its pages written on a spare core while the
            # network runs (cryoves._memory.Prefaulted); not for volumes predicted in a child
            # process (full size: this process's memory bound)
            warm_labels = _memory.Prefaulted(shape, np.int32) if math.prod(shape) < CHILD_PROCESS_VOXELS else None
            try:
                probability, large = predict_stage(tomogram, vs, model, params, progress=progress)
            except BaseException:
                if warm_labels is not None:
                    warm_labels.discard()
                raise
    else:
        probability = _check_probability(probability, shape)
        if large_probability is not None:
            large = _check_probability(large_probability, shape, name="large_probability")
        report(progress, "predict", 1, 1)
    labels_out = warm_labels.take() if warm_labels is not None else None
    timings["predict"] = time.perf_counter() - t0

    # 2. global threshold ---------------------------------------------------------------------
    t0 = time.perf_counter()
    _workers.start_for(tomogram)  # the per-vesicle stages' helper processes import meanwhile
    normalization = intensity_normalization(tomogram)
    release_pages(tomogram)
    g = global_stage(tomogram, probability, vs, params, large=large, mask=mask, normalization=normalization,
                     labels_out=labels_out, progress=progress)
    if not keep_intermediates:
        large = None
    threshold = float(g.threshold)
    if not np.any(np.isfinite(g.shell_means)):
        threshold = float("nan")  # nothing above any candidate: no real choice was made
    labels = g.labels
    if keep_intermediates:
        stage_labels["global"] = labels
    _release_pages(tomogram, probability, large)
    timings["global"] = time.perf_counter() - t0

    g_threshold = g.threshold
    del g  # its label volume lives on as `labels` only while needed (memory on large tomograms)

    # 3. adaptive threshold -------------------------------------------------------------------
    t0 = time.perf_counter()
    # without intermediates the global stage's labels are referenced nowhere else: worked in place
    labels = adaptive_stage(probability, labels, g_threshold, vs, params, mask=mask,
                            overwrite_labels=not keep_intermediates, progress=progress)
    if keep_intermediates:
        stage_labels["adaptive"] = labels
    _release_pages(tomogram, probability, large)
    timings["adaptive"] = time.perf_counter() - t0

    # 4. sphere refinement --------------------------------------------------------------------
    t0 = time.perf_counter()
    table = refine_stage(tomogram, labels, vs, params, mask=mask, normalization=normalization, progress=progress)
    del labels
    stage_tables["refine"] = table
    if keep_intermediates:
        stage_labels["refine"] = render_labels(table, shape)
    _release_pages(tomogram, probability, large)
    timings["refine"] = time.perf_counter() - t0

    # 5. outliers -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    table = outliers_stage(tomogram, table, vs, params, mask=mask, normalization=normalization, progress=progress)
    stage_tables["outliers"] = table
    final = render_labels(table, shape)
    if keep_intermediates:
        stage_labels["outliers"] = final
    _release_pages(tomogram, probability, large)
    timings["outliers"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    warnings_ = check_result(tomogram, table, vs, params=params, warn=True)  # implausible: ResultWarning

    return SegmentationResult(table=table, labels=final, probability=probability, stage_labels=stage_labels,
                              stage_tables=stage_tables, threshold=threshold, timings=timings,
                              params=params, voxel_size=vs, warnings=list(warnings_), large_probability=large,
                              prediction=prediction)
