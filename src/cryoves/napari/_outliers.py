"""4. Outlier filter: Mahalanobis p-values of the vesicles, previewed live, then the filter."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import FloatSlider, Label

from cryoves.napari._base import StageWidget, materialize, tomogram_array
from cryoves.napari._layers import STATUS_COLORS, base_name, table_from_points
from cryoves.napari._params import default_value
from cryoves.napari._plots import feature_plot
from cryoves.napari._results import show_vesicles

__all__ = ["OutlierWidget"]


def _display_columns(table) -> dict:
    """Radius, thickness (nm if the voxel size is known, else voxels) and density of ``table``."""
    if table.voxel_size:
        return {"radius": table.nm("radius"), "thickness": table.nm("thickness"),
                "density": np.asarray(table["density"], float), "unit": "nm"}
    return {"radius": np.asarray(table["radius"], float), "thickness": np.asarray(table["thickness"], float),
            "density": np.asarray(table["density"], float), "unit": "vox"}


class OutlierWidget(StageWidget):
    """Stage 4: Mahalanobis outliers of (thickness, density, radius), previewed live.

    Moving the p-value slider colours the vesicles that would be re-fitted (and removed if
    they stay outliers) in red, in the viewer and in the feature plot. The preview changes only
    the display (border colours): the layer's features, which are exported, stay as they are,
    and the colours are restored when the widget closes. *Apply* runs
    :func:`cryoves.pipeline.outliers_stage` (:func:`cryoves.outliers.filter_outliers`, as the
    full pipeline) and writes the vesicles and vesicle labels.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "4. Outlier filter"
    run_text = "Apply outlier filter"

    def build(self):
        self.tomogram = self.tomogram_combo()
        self.vesicles = self.layer_combo("Vesicles", "Points", "The fitted vesicles (Refine)",
                                         roles=("vesicles",), exclude_roles=("truth_vesicles",))
        self.p_threshold = FloatSlider(value=float(default_value("p_threshold")), min=0.0,
                                       max=1.0, step=0.005, readout=True, label="p-value threshold",
                                       tooltip="Vesicles whose Mahalanobis p-value (thickness, density, "
                                               "radius) is below this are re-fitted with a growing box, "
                                               "and removed if still below. Paper: 0.3, which also "
                                               "removes many real vesicles; the default is stricter.")
        self.summary = Label(value="")
        self.summary.native.setWordWrap(True)
        self.main.extend([self.tomogram, self.vesicles, self.p_threshold, self.summary])
        self.add_fields("outliers")
        self._pvalues = None
        self._table = None
        self._saved = None  # (layer, border colours before the preview)
        #: Rows of the chosen layer that the current threshold flags (bool array), or None.
        self.flagged = None
        self.p_threshold.changed.connect(self.preview)
        self.vesicles.changed.connect(self.compute_pvalues)

    def extra_widgets(self):
        from qtpy.QtWidgets import QAbstractItemView, QTableWidget

        self._plot = feature_plot()
        self.flagged_table = QTableWidget(0, 5)
        self.flagged_table.setHorizontalHeaderLabels(["id", "p-value", "radius nm", "thick. nm", "density"])
        self.flagged_table.verticalHeader().setVisible(False)
        self.flagged_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.flagged_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.flagged_table.setToolTip("The vesicles below the p-value threshold; click a row to go to it")
        self.flagged_table.horizontalHeader().setStretchLastSection(True)
        self.flagged_table.setMaximumHeight(130)
        self.flagged_table.setVisible(False)
        self.flagged_table.cellClicked.connect(self._go_to_row)
        return ([self._plot.canvas] if self._plot.canvas is not None else []) + [self.flagged_table]

    def missing_hint(self, what):
        return "run the Refine widget first" if what == "vesicles" else super().missing_hint(what)

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "_plot") and not self.closed:
            self.compute_pvalues()

    # -- preview ---------------------------------------------------------------------------
    def compute_pvalues(self, *_):
        """p-values of the accepted vesicles of the chosen layer, then the preview."""
        from cryoves.outliers import mahalanobis_pvalues

        layer = self.vesicles.value
        if self._saved is not None and self._saved[0] is not layer:
            self.restore_colors()
        if layer is None:
            self._pvalues, self._table, self.flagged = None, None, None
            self.summary.value = ""
            return
        table = table_from_points(layer)
        try:
            p = np.asarray(mahalanobis_pvalues(table, features=self.params().features,
                                               robust=bool(self.fields["robust"].value)), dtype=float)
        except Exception as exc:  # noqa: BLE001 - e.g. missing features: say so, no traceback
            from cryoves.napari._runner import describe_error

            self.summary.value = f"p-values unavailable: {describe_error(exc)}"
            self._pvalues, self._table, self.flagged = None, None, None
            return
        self._pvalues, self._table = p, table
        self.preview()

    def preview(self, *_):
        """Colour the vesicles that the current p-value threshold would refine/remove (display only)."""
        layer = self.vesicles.value
        if self.closed or layer is None or self._pvalues is None or len(layer.data) != len(self._pvalues):
            return
        thr = float(self.p_threshold.value)
        p = self._pvalues
        status = np.asarray(self._table["status"], dtype=str)
        accepted = status == "accepted"
        flagged = accepted & np.isfinite(p) & (p < thr)
        self.flagged = flagged
        if self._saved is None or self._saved[0] is not layer or len(self._saved[1]) != len(flagged):
            # first preview of this layer, or the layer was rewritten meanwhile: its colours now
            self._saved = (layer, np.array(layer.border_color, copy=True))
        if len(flagged):
            colors = self._saved[1].copy()
            colors[flagged] = (1.0, 48 / 255, 48 / 255, 1.0)  # STATUS_COLORS["removed"]
            layer.border_color = colors
        self.summary.value = (f"{int(flagged.sum())} of {int(accepted.sum())} vesicles have p < {thr:.2f} (red): "
                              "they will be re-fitted with a larger box and removed if still outliers.")
        self._plot.show(_display_columns(self._table), accepted, flagged)
        self._fill_table(flagged, p)

    def restore_colors(self) -> None:
        """Take the red preview off the vesicles layer (its colours from before the preview)."""
        if self._saved is None:
            return
        layer, colors = self._saved
        self._saved = None
        if layer not in self.viewer.layers:
            return
        if len(layer.data) == len(colors):
            layer.border_color = colors
        elif "status" in layer.features:  # rows were added meanwhile: colour by status
            layer.border_color = [STATUS_COLORS.get(s, "#ffffff") for s in layer.features["status"].astype(str)]

    def on_close(self):
        self.restore_colors()
        self.flagged = None

    def _fill_table(self, flagged, p):
        from qtpy.QtWidgets import QTableWidgetItem

        t = self._table
        cols = _display_columns(t)
        rows = np.flatnonzero(flagged)
        rows = rows[np.argsort(p[rows])]
        self.flagged_table.setRowCount(len(rows))
        self._table_rows = rows
        for i, r in enumerate(rows):
            vals = [str(int(t["id"][r])), f"{p[r]:.3g}", f"{cols['radius'][r]:.1f}",
                    f"{cols['thickness'][r]:.2f}", f"{cols['density'][r]:.3g}"]
            for j, v in enumerate(vals):
                self.flagged_table.setItem(i, j, QTableWidgetItem(v))
        self.flagged_table.resizeColumnsToContents()
        self.flagged_table.setVisible(len(rows) > 0)

    def _go_to_row(self, row, _col=None):
        """Show the vesicle of a table row: move the slice to it, centre the view, select its point."""
        layer = self.vesicles.value
        if layer is None or row >= len(getattr(self, "_table_rows", [])):
            return
        i = int(self._table_rows[row])
        world = layer.data_to_world(layer.data[i])
        for ax in self.viewer.dims.not_displayed:
            self.viewer.dims.set_point(ax, float(world[ax]))
        self.viewer.scene.camera.center = tuple(float(w) for w in world)
        layer.selected_data = {i}

    # -- apply -----------------------------------------------------------------------------
    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        pts = self.require(self.vesicles, "vesicles")
        tomo = tomogram_array(layer)
        vs = self.voxel_size_from(layer)
        table = table_from_points(pts)
        if table.voxel_size is None:
            table.voxel_size = vs
        params = self.params().replace(p_threshold=float(self.p_threshold.value))
        name = base_name(layer)

        def work(progress):
            from cryoves.pipeline import outliers_stage

            return outliers_stage(materialize(tomo), table, vs, params, progress=progress)

        def done(new):
            self.restore_colors()
            show_vesicles(self.viewer, new, name, tomo.shape)
            self._saved = None
            self.compute_pvalues()
            n_acc = int(np.sum(new["status"] == "accepted"))
            n_before = int(np.sum(table["status"] == "accepted"))
            return f"Outlier filter: {n_acc} vesicles kept, {n_before - n_acc} removed"

        self.runner.start(work, done, "Outlier filter")
