"""3. Refine spheres: fit every segment as a sphere → vesicles Points layer + vesicle labels."""

from __future__ import annotations

import numpy as np

from cryoves.napari._base import StageWidget, materialize, tomogram_array
from cryoves.napari._layers import base_name
from cryoves.napari._results import show_vesicles

__all__ = ["RefineWidget"]


class RefineWidget(StageWidget):
    """Stage 3: fit every segment as a sphere by its radial profile → vesicles Points + labels.

    Runs :func:`cryoves.pipeline.refine_stage`, as the full pipeline does.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "3. Refine spheres"
    run_text = "Fit spheres"

    def build(self):
        self.tomogram = self.tomogram_combo()
        self.labels = self.layer_combo("Segments", "Labels", "Label volume to start from (adaptive or "
                                       "global threshold)", roles=("labels_adaptive", "labels_global"),
                                       exclude_roles=("vesicle_labels",))
        self.main.extend([self.tomogram, self.labels])
        self.add_fields("refine")

    def missing_hint(self, what):
        return "run the Threshold widget first" if what == "segments" else super().missing_hint(what)

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        seg = self.require(self.labels, "segments")
        tomo = tomogram_array(layer)
        labels = np.asarray(seg.data)
        if labels.shape != tomo.shape:
            raise ValueError(f"segments {labels.shape} and tomogram {tomo.shape} differ in shape")
        vs = self.voxel_size_from(layer)
        name = base_name(layer)
        params = self.params()

        def work(progress):
            from cryoves.pipeline import refine_stage

            return refine_stage(materialize(tomo), labels, vs, params, progress=progress)

        def done(table):
            show_vesicles(self.viewer, table, name, tomo.shape)
            seg.visible = False
            n = int(np.sum(table["status"] == "accepted"))
            return f"{n} spheres fitted ({len(table) - n} segments rejected)"

        self.runner.start(work, done, "Sphere fitting")
