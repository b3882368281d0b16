"""One definition of every user-facing parameter, shared by the stage widgets and the pipeline.

Each field is named after its :class:`cryoves.pipeline.SegmentParams` attribute and takes its
default from ``SegmentParams()`` (which reads the stage functions' defaults), so the stage
widgets and the one-button pipeline always offer the same parameters with the same defaults.
:func:`params_from` turns the fields into a ``SegmentParams``, which the stage widgets hand to
the stage functions of :mod:`cryoves.pipeline` (``predict_stage``, ``global_stage``, ...), the
functions :func:`cryoves.pipeline.segment` runs.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

__all__ = ["SPECS", "make_field", "params_from", "default_value", "STAGE_FIELDS"]

# name -> (label, tooltip, kind, options)
SPECS: dict[str, tuple[str, str, str, dict]] = {
    # predict
    "tta": ("Test-time augmentation", "Average the prediction over the 8 flips of every tile: "
            "slightly better, 8x slower.", "bool", {}),
    "tile": ("Tile size (voxels)", "Edge of the cubic tiles the network runs on, in voxels of the "
             "rescaled tomogram. 0 = automatic; smaller tiles need less memory.", "int",
             {"min": 0, "max": 1024, "step": 16}),
    # global / adaptive threshold
    "connectivity": ("Connectivity", "Segment connectivity: 1 = face neighbours only (6-connected, keeps "
                     "touching vesicles apart), 3 = 26-connected (reference code).", "choice",
                     {"choices": [1, 2, 3]}),
    "adaptive": ("Adaptive threshold", "Split merged vesicles and grow partial ones with a per-segment "
                 "threshold (else the global segments go straight to sphere fitting).", "bool", {}),
    "threshold_mode": ("Threshold rule", "robust: the darkest-shell threshold plus the vesicles a less sure "
                       "network marks below it (p >= 'Weak threshold'), each kept only where the tomogram "
                       "shows a membrane; paper: the darkest-shell threshold alone.", "choice",
                       {"choices": ["robust", "paper"]}),
    "low_threshold": ("Weak threshold", "Robust rule: regions above this probability that the global "
                      "threshold missed are checked for a vesicle membrane.", "float",
                      {"min": 0.05, "max": 0.99, "step": 0.05}),
    "segment_min_radius_nm": ("Min. segment radius (nm)", "Segments smaller than a sphere of this radius "
                              "(nm) are grown or dropped (a segment ends at the membrane centre, so this "
                              "is below the vesicle radius).", "float",
                              {"min": 0.5, "max": 200.0, "step": 0.5, "decimals": 1}),
    "min_radius_nm": ("Min. radius (nm)", "Smallest vesicle (outer) radius, nm: smaller fitted vesicles are "
                      "removed by the outlier stage. In the full pipeline the threshold stage's min. segment "
                      "radius moves with it (2 nm less by default).", "float",
                      {"min": 0.5, "max": 200.0, "step": 0.5, "decimals": 1}),
    "z_split": ("Split if size z-score >", "A segment is split when its volume z-score exceeds this "
                "and its extent is below 'Split if extent <' (paper: 1).", "float",
                {"min": 0.0, "max": 10.0, "step": 0.1}),
    "extent_split": ("Split if extent <", "Extent = volume / bounding-box volume (a sphere has 0.52). "
                     "Large, less compact segments are split (paper 0.25, reference code 0.5).", "float",
                     {"min": 0.0, "max": 1.0, "step": 0.05}),
    "extent_lo": ("Min. extent", "Segments less compact than this are dropped (paper 0.25).", "float",
                  {"min": 0.0, "max": 1.0, "step": 0.05}),
    "extent_hi": ("Max. extent", "Segments more compact than this are dropped (paper 0.75; a cube "
                  "has 1).", "float", {"min": 0.0, "max": 1.0, "step": 0.05}),
    "grow_min": ("Lowest grow threshold", "Small segments may be grown down to this probability "
                 "(paper 0.8).", "float", {"min": 0.0, "max": 1.0, "step": 0.01}),
    "split_part_min": ("Min. split part", "A part split off a merged clump is kept from this fraction of the "
                       "min. segment volume on (its neighbours keep it from growing); 1 = the paper's rule.",
                       "float", {"min": 0.0, "max": 1.0, "step": 0.05}),
    # refine
    "refine_min_radius_nm": ("Min. fit radius (nm)", "Fits with a smaller outer radius (nm) are "
                             "rejected.", "float", {"min": 0.5, "max": 500.0, "step": 0.5, "decimals": 1}),
    "refine_max_radius_nm": ("Max. fit radius (nm)", "Upper bound of the membrane search (nm).", "float",
                             {"min": 1.0, "max": 1000.0, "step": 1.0, "decimals": 1}),
    "refine_max_iter": ("Max. iterations", "Radial-profile + cross-correlation iterations per vesicle "
                        "(paper 10).", "int", {"min": 1, "max": 100}),
    "sigma_vox": ("Profile smoothing (voxels)", "Gaussian sigma, voxels, of the radial-profile "
                  "derivatives (paper 1).", "float", {"min": 0.0, "max": 10.0, "step": 0.1}),
    "radius_method": ("Radius from", "Outer membrane edge: membrane centre + half the bilayer (default), "
                      "steepest slope of the profile, or minimum of its smoothed second derivative "
                      "(paper).", "choice", {"choices": ["membrane_centre", "max_slope", "second_derivative"]}),
    "capture": ("Re-centre first", "Re-centre on the membrane before iterating (helps segments that "
                "cover only part of a vesicle).", "bool", {}),
    # outliers
    "outliers": ("Outlier filter", "Re-fit vesicles with unusual (thickness, density, radius) and "
                 "remove those that stay outliers.", "bool", {}),
    "p_threshold": ("Outlier p-value", "Vesicles whose Mahalanobis p-value is below this are re-fitted "
                    "with a growing box and removed if still below (paper 0.3, which also removes many "
                    "real vesicles; the default is stricter).", "float",
                    {"min": 0.0, "max": 1.0, "step": 0.01, "decimals": 3}),
    "outlier_max_iter": ("Re-fits per outlier", "Each re-fit uses a box larger by 'Box growth'.", "int",
                         {"min": 0, "max": 50}),
    "grow_vox": ("Box growth (voxels)", "Box edge growth per re-fit, voxels (paper 2).", "int",
                 {"min": 0, "max": 20}),
    "remove_overlaps": ("Resolve overlaps", "Shrink or drop overlapping spheres (reference code).", "bool", {}),
    "robust": ("Robust statistics", "Estimate mean and covariance without gross outliers (else the "
               "paper's plain estimates).", "bool", {}),
    "max_rounds": ("Outlier rounds", "Rounds of p-value recomputation after removals.", "int",
                   {"min": 1, "max": 20}),
    "min_coverage": ("Closed membrane", "Remove spheres whose membrane is seen in fewer than this fraction of "
                     "the directions (tubes, folds, ellipsoids) unless a re-fit closes it; 0 = no check.",
                     "float", {"min": 0.0, "max": 1.0, "step": 0.05}),
    "faint_score_relative": ("Faint membrane", "Remove spheres whose membrane scores below this fraction of the "
                             "tomogram's median and whose lumen is lighter than the other vesicles' (ends of tubes "
                             "and compartments seen from inside) unless a re-fit fixes them; 0 = no check.",
                             "float", {"min": 0.0, "max": 1.0, "step": 0.05}),
}

#: Which fields each stage widget shows (main, advanced); the pipeline shows all of them.
STAGE_FIELDS = {
    "predict": ((), ("tile", "tta")),
    "adaptive": (("threshold_mode", "segment_min_radius_nm"),
                 ("low_threshold", "connectivity", "z_split", "extent_split", "extent_lo", "extent_hi",
                  "grow_min", "split_part_min")),
    "refine": ((), ("refine_min_radius_nm", "refine_max_radius_nm", "refine_max_iter", "sigma_vox",
                    "radius_method", "capture")),
    "outliers": ((), ("min_radius_nm", "outlier_max_iter", "grow_vox", "remove_overlaps", "robust",
                      "max_rounds", "min_coverage", "faint_score_relative")),
}


def _defaults() -> dict[str, Any]:
    from dataclasses import asdict

    from cryoves.pipeline import SegmentParams

    d = asdict(SegmentParams())
    d["extent_lo"], d["extent_hi"] = d["extent_range"]
    d["tile"] = int(d["tile_shape"][0]) if d.get("tile_shape") else 0
    return d


def default_value(name: str):
    """The pipeline's default of parameter ``name`` (a :class:`SegmentParams` attribute)."""
    return _defaults()[name]


def make_field(name: str, value=None):
    """The widget for parameter ``name`` with the pipeline's default (or ``value``)."""
    label, tip, kind, opts = SPECS[name]
    v = _defaults()[name] if value is None else value
    if kind == "bool":
        return CheckBox(value=bool(v), label=label, tooltip=tip, name=name)
    if kind == "choice":
        return ComboBox(choices=opts["choices"], value=v, label=label, tooltip=tip, name=name)
    if kind == "int":
        return SpinBox(value=int(v), min=opts.get("min", 0), max=opts.get("max", 10000),
                       step=opts.get("step", 1), label=label, tooltip=tip, name=name)
    w = FloatSpinBox(value=float(v), min=opts.get("min", 0.0), max=opts.get("max", 1000.0),
                     step=opts.get("step", 0.1), label=label, tooltip=tip, name=name)
    w.native.setDecimals(opts.get("decimals", 2))
    return w


def params_from(fields: dict) -> "SegmentParams":  # noqa: F821
    """A validated :class:`~cryoves.pipeline.SegmentParams` from field widgets (others: defaults)."""
    from cryoves.pipeline import SegmentParams

    values = {name: w.value for name, w in fields.items()}
    changes: dict[str, Any] = {}
    for name, v in values.items():
        if name in ("extent_lo", "extent_hi"):
            continue
        if name == "tile":
            changes["tile_shape"] = (int(v),) * 3 if int(v) else None
            continue
        changes[name] = v
    if "extent_lo" in values or "extent_hi" in values:
        lo, hi = SegmentParams().extent_range
        changes["extent_range"] = (float(values.get("extent_lo", lo)), float(values.get("extent_hi", hi)))
    return SegmentParams().replace(**changes)
