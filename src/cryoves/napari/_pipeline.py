"""Find vesicles (full pipeline): every stage with one button, the same layers as stage by stage."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import Label

from cryoves.napari._base import StageWidget, check_probability, materialize, tomogram_array
from cryoves.napari._layers import base_name
from cryoves.napari._params import SPECS, make_field
from cryoves.napari._predict import show_large_map
from cryoves.napari._results import show_segmentation
from cryoves.napari._service import get_model, run_in_tf_thread
from cryoves.napari._weights_panel import WeightsPanel

__all__ = ["PipelineWidget"]

#: The parameter groups under *Advanced parameters*, in stage order.
GROUPS = (("1. Prediction", ("tile", "tta")),
          ("2. Threshold", ("connectivity", "adaptive", "min_radius_nm", "z_split", "extent_split",
                            "extent_lo", "extent_hi", "grow_min", "split_part_min")),
          ("3. Sphere fitting", ("refine_min_radius_nm", "refine_max_radius_nm", "refine_max_iter",
                                 "sigma_vox", "radius_method", "capture")),
          ("4. Outliers", ("outliers", "p_threshold", "outlier_max_iter", "grow_vox",
                           "remove_overlaps", "robust", "max_rounds")))


class PipelineWidget(StageWidget):
    """All stages on the chosen tomogram with one button (:func:`cryoves.pipeline.segment`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "Find vesicles (full pipeline)"
    run_text = "Find vesicles"

    def build(self):
        self.tomogram = self.tomogram_combo()
        self.panel = WeightsPanel(self.tomogram)
        self.probability = self.layer_combo(
            "Reuse probability", "Image", "Optional: an existing probability map of this tomogram (values "
            "0..1); the network, and with it the large-vesicle pass, is then skipped", nullable=True,
            exclude_roles=("probability_large",), name="probability")
        self.large = self.layer_combo(
            "Reuse large-vesicle map", "Image", "Optional, with 'Reuse probability': the large-vesicle map "
            "written by Predict with that probability map (layer '... probability (large vesicles)'), so that "
            "the result is that of a run with the network", nullable=True, name="large")
        self.mask = self.layer_combo(
            "Region mask", "Labels", "Optional: only look for vesicles inside this region (non-zero "
            "voxels), e.g. the presynaptic cytoplasm; same shape as the tomogram", nullable=True,
            exclude_roles=("labels_global", "labels_adaptive", "vesicle_labels", "truth_labels"), name="mask")
        self.main.extend([self.tomogram, *self.panel.widgets])
        self.advanced.extend([self.probability, self.large, self.mask])
        for title, names in GROUPS:
            self.advanced.append(Label(value=f"<b>{title}</b>", label=""))
            for name in names:
                if name not in SPECS:
                    raise KeyError(f"no field definition for parameter {name!r}")
                self.fields[name] = make_field(name)
                self.advanced.append(self.fields[name])

    def params(self):
        """:class:`cryoves.pipeline.SegmentParams` of the fields; "Min. radius" is the smallest vesicle:
        both size rules move with it (:meth:`~cryoves.pipeline.SegmentParams.for_min_radius`)."""
        from cryoves.napari._params import params_from

        fields = {k: w for k, w in self.fields.items() if k != "min_radius_nm"}
        return params_from(fields).for_min_radius(float(self.fields["min_radius_nm"].value))

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "panel") and not self.closed:
            self.panel.refresh()

    def autoselect(self, *_):
        # never pre-select a probability map or a mask: reusing one is an explicit choice
        pass

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        data = tomogram_array(layer)
        vs = self.panel.voxel_size_for(layer)
        prob = None
        if self.probability.value is not None:
            prob = check_probability(self.probability.value)
            if prob.shape != data.shape:
                raise ValueError(f"probability {prob.shape} and tomogram {data.shape} differ in shape")
        large = None
        if self.large.value is not None:
            if prob is None:
                raise ValueError("a large-vesicle map is reused only with its probability map: choose "
                                 "'Reuse probability' too, or clear 'Reuse large-vesicle map'")
            large = check_probability(self.large.value)
            if large.shape != data.shape:
                raise ValueError(f"large-vesicle map {large.shape} and tomogram {data.shape} differ in shape")
        mask = None
        if self.mask.value is not None:
            mask = np.asarray(self.mask.value.data)
            if mask.shape != data.shape:
                raise ValueError(f"region mask {mask.shape} and tomogram {data.shape} differ in shape")
        path = self.panel.require_weights() if prob is None else None
        params = self.params()
        self.panel.record(layer, vs)
        name = base_name(layer)

        def pipeline(progress):
            from cryoves.pipeline import segment

            model = get_model(path) if prob is None else None
            return segment(materialize(data), vs, model, params=params, mask=mask,
                           probability=None if prob is None else materialize(prob),
                           large_probability=None if large is None else materialize(large), progress=progress)

        def work(progress):
            if prob is not None:  # no network: run right here
                return pipeline(progress)
            return run_in_tf_thread(pipeline, progress)

        def done(result):
            show_segmentation(self.viewer, result, name, data.shape, vs)
            if prob is None or result.large_probability is not None:  # a new prediction, or the map reused
                show_large_map(self.viewer, name, vs, result.large_probability)
            line = f"{result.n_accepted} vesicles found"
            if result.n_removed:
                line += f" ({result.n_removed} candidates rejected, kept as hidden points for review)"
            if np.isfinite(result.threshold):
                line += f"; global threshold {result.threshold:.2f}"
            if result.warnings:  # implausible results (e.g. inverted contrast): say so, loudly
                from napari.utils.notifications import show_warning

                for w in result.warnings:
                    show_warning(f"cryoves: {w}")
                line += f"; {len(result.warnings)} warning(s): " + "; ".join(result.warnings)
            return line

        self.runner.start(work, done, "Vesicle segmentation")
