"""The cryoves dock widgets: Predict, Threshold, Refine, Outlier filter, Export, full pipeline.

Each stage widget picks its input layers from the viewer (pre-selecting the previous stage's
output for the chosen tomogram, see :mod:`cryoves.napari._layers`), runs the core function in
a worker thread (progress bar, *Cancel*), and writes its output layer, replacing the output of
an earlier run of the same stage. So a user can run stage by stage, change a parameter and
rerun only that stage. The full-pipeline widget runs :func:`cryoves.pipeline.segment` with the
same parameters and produces the same layers.

TensorFlow is imported only through :func:`cryoves._tf.import_tensorflow` (see
``docs/architecture.md``), in the worker, right before a model is loaded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import FileEdit, FloatSlider, Label, LineEdit, PushButton

from cryoves.napari._base import StageWidget, float_field, optional_checkbox
from cryoves.napari._layers import (SHAPE_KEY, STATUS_COLORS, VOXEL_KEY, add_or_update, base_name,
                                    image_kwargs, labels_kwargs, layer_name, set_thick_slicing,
                                    table_from_points, vesicle_layers_data, voxel_size_of)
from cryoves.napari._params import adaptive_kwargs, outlier_kwargs, predict_kwargs, refine_kwargs

__all__ = ["PredictWidget", "ThresholdWidget", "RefineWidget", "OutlierWidget", "ExportWidget",
           "PipelineWidget", "load_model_cached", "weights_info"]

log = logging.getLogger("cryoves.napari")

_MODELS: dict[str, Any] = {}
REFERENCE_WEIGHTS_VOXEL_NM = 2.2


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------
def _weights_path(value) -> str | None:
    """FileEdit value -> path string, or None for the default weights."""
    if value is None:
        return None
    s = str(value).strip()
    return None if s in ("", ".") else s


def weights_info(path: str | None) -> tuple[float | None, str]:
    """Training voxel size and a description of the weights at ``path``, without TensorFlow.

    Parameters
    ----------
    path : str or None
        Weights file (``None``: the default weights shipped with cryoves).

    Returns
    -------
    voxel_size_nm : float or None
        None if the weights cannot be used (the description says why).
    description : str
    """
    from cryoves import model as _model

    try:
        p = Path(path).expanduser() if path else _model.default_weights_path()
    except FileNotFoundError:
        return None, ("No default weights are installed with cryoves yet: choose a weights file "
                      "(cryoves NAME.weights.h5, or the CryoVesNet weights.h5).")
    if not p.exists():
        return None, f"Weights file not found: {p}"
    if p.is_file() and p.name.endswith(".weights.h5"):
        card = p.parent / (p.name[: -len(".weights.h5")] + ".json")
        if card.is_file():
            try:
                c = _model.ModelCard.from_json(card)
                return float(c.voxel_size_nm), f"{c.name} (trained at {c.voxel_size_nm:.2f} nm)"
            except Exception as exc:  # noqa: BLE001
                return None, f"Invalid model card {card.name}: {exc}"
    try:
        import h5py

        target = p
        if p.is_dir():
            cands = sorted(p.glob("*.weights.h5")) + sorted(p.glob("*.h5"))
            if not cands:
                return None, f"No weights (*.h5) in folder {p}"
            return weights_info(str(cands[0]))
        with h5py.File(target, "r") as fh:
            if "model_config" in fh.attrs:
                return REFERENCE_WEIGHTS_VOXEL_NM, (
                    f"CryoVesNet reference weights {p.name} (trained at {REFERENCE_WEIGHTS_VOXEL_NM:.1f} nm)")
    except OSError as exc:
        return None, f"Not an HDF5 weights file: {p.name} ({exc})"
    return None, f"{p.name} is neither cryoves weights (with a .json card) nor CryoVesNet weights"


_TF_LOCK = threading.Lock()
_TF_EXECUTOR = None


def run_in_tf_thread(fn, *args, **kwargs):
    """Run ``fn`` in the one thread that does all of the plugin's TensorFlow work, and wait for it.

    Loading a model and predicting always happen in this same long-lived thread (with a large
    stack), never in whichever pooled worker thread a napari task got: a Keras model and its
    traced functions then never cross threads. Called from a napari worker thread, so the GUI
    stays free; exceptions (including :class:`cryoves.Cancelled` raised by the progress
    callback) propagate to the caller.
    """
    global _TF_EXECUTOR
    with _TF_LOCK:
        if _TF_EXECUTOR is None:
            from concurrent.futures import ThreadPoolExecutor

            old = threading.stack_size()
            threading.stack_size(64 * 1024 * 1024)
            try:
                ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryoves-tensorflow")
                ex.submit(lambda: None).result()  # start the thread now, with the large stack
            finally:
                threading.stack_size(old)
            _TF_EXECUTOR = ex
    return _TF_EXECUTOR.submit(fn, *args, **kwargs).result()


def load_model_cached(path: str | None):
    """Load (once per path) a U-Net; imports TensorFlow safely first.

    Call it inside :func:`run_in_tf_thread` (the models are used in that thread only).
    """
    from cryoves._tf import import_tensorflow

    import_tensorflow()
    from cryoves.model import load_model

    key = str(Path(path).expanduser().resolve()) if path else "<default>"
    if key not in _MODELS:
        _MODELS[key] = load_model(path)
    return _MODELS[key]


def _tomogram_array(layer) -> np.ndarray:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"layer {layer.name!r} is {data.ndim}-D; cryoves needs a 3-D tomogram (Z, Y, X)")
    return data


def _materialize(data) -> np.ndarray:
    """A numpy array (computes a lazy dask array; memory maps stay memory maps). Worker thread only."""
    if hasattr(data, "compute") and not isinstance(data, np.ndarray):
        return np.asarray(data.compute())
    return data


def _set_voxel_size(layer, vs: float) -> None:
    """Record an edited voxel size on the tomogram layer (scale and metadata)."""
    if voxel_size_of(layer) is None or not np.isclose(voxel_size_of(layer), vs):
        layer.metadata[VOXEL_KEY] = float(vs)
        layer.scale = (float(vs),) * layer.ndim
        try:
            layer.units = ("nm",) * layer.ndim
        except Exception:  # noqa: BLE001 - older napari without units
            pass


def _weights_widgets(owner: StageWidget):
    owner.weights = FileEdit(mode="r", filter="*.h5", value="", label="Weights",
                             tooltip="U-Net weights file. Empty: the default weights shipped with cryoves. "
                                     "Accepts cryoves NAME.weights.h5 (+ NAME.json card) and the "
                                     "reference CryoVesNet weights.h5.")
    owner.weights_label = Label(value="")
    owner.weights_label.native.setWordWrap(True)
    owner.voxel_size = float_field(
        "Voxel size (nm)", 1.0, "Voxel size of the tomogram in nm, read from the MRC header. Correct it "
        "here if the header is wrong; the tomogram is rescaled to the model's training voxel size.",
        min=0.01, max=100.0, step=0.01, decimals=3)
    owner.rescale_label = Label(value="")
    owner.rescale_label.native.setWordWrap(True)
    owner._model_vs = None


def _update_weights_info(owner: StageWidget, *_):
    vs, text = weights_info(_weights_path(owner.weights.value))
    owner._model_vs = vs
    owner.weights_label.value = text
    _update_rescale(owner)


def _update_rescale(owner: StageWidget, *_):
    if getattr(owner, "_vs_unknown", False):
        owner.rescale_label.value = "⚠ The voxel size of this tomogram is unknown: enter it above (nm)."
        return
    if owner._model_vs is None:
        owner.rescale_label.value = ""
        return
    f = float(owner.voxel_size.value) / owner._model_vs
    owner.rescale_label.value = (f"Model voxel size {owner._model_vs:.2f} nm → tomogram rescaled by "
                                 f"×{f:.3f} for prediction")


def _update_voxel_field(owner: StageWidget, *_):
    layer = owner.tomogram.value
    if layer is None:
        return
    vs = voxel_size_of(layer)
    owner._vs_unknown = vs is None
    if vs is not None and not np.isclose(vs, owner.voxel_size.value):
        owner._setting_vs = True
        try:
            owner.voxel_size.value = vs
        finally:
            owner._setting_vs = False
    _update_rescale(owner)


def _voxel_size_edited(owner: StageWidget, *_):
    if not getattr(owner, "_setting_vs", False):
        owner._vs_unknown = False  # the user typed it
    _update_rescale(owner)


def _checked_voxel_size(owner: StageWidget, layer) -> float:
    if getattr(owner, "_vs_unknown", False):
        raise ValueError(f"the voxel size of {layer.name!r} is unknown (no usable value in the MRC header): "
                         "enter it in nm in 'Voxel size (nm)'")
    return owner.voxel_size_from(layer, owner.voxel_size)


# ----------------------------------------------------------------------------------------
# 1. Predict
# ----------------------------------------------------------------------------------------
class PredictWidget(StageWidget):
    """Stage 1: U-Net probability map of the chosen tomogram → layer ``<tomo> probability``.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "1. Predict"
    run_text = "Predict"

    def build(self):
        self.tomogram = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                         exclude_roles=("probability",))
        _weights_widgets(self)
        self.main.extend([self.tomogram, self.weights, self.weights_label, self.voxel_size,
                          self.rescale_label])
        self.add_fields("predict")
        self.tomogram.changed.connect(lambda *_: _update_voxel_field(self))
        self.weights.changed.connect(lambda *_: _update_weights_info(self))
        self.voxel_size.changed.connect(lambda *_: _voxel_size_edited(self))
        _update_weights_info(self)

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "voxel_size"):
            _update_voxel_field(self)

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        data = _tomogram_array(layer)
        vs = _checked_voxel_size(self, layer)
        path = _weights_path(self.weights.value)
        if self._model_vs is None:
            raise ValueError(self.weights_label.value or "choose a weights file")
        kw = predict_kwargs(self.params())
        _set_voxel_size(layer, vs)
        tomo = base_name(layer)

        def predict(progress):
            from cryoves.predict import predict_probability

            model = load_model_cached(path)
            return predict_probability(_materialize(data), vs, model, progress=progress, **kw)

        def work(progress):
            return run_in_tf_thread(predict, progress)

        def done(prob):
            add_or_update(self.viewer, (prob, image_kwargs(vs, layer_name(tomo, "probability"),
                                                           role="probability", tomogram=tomo), "image"))
            return f"Probability map: {layer_name(tomo, 'probability')}"

        self.runner.start(work, done, "Prediction")


# ----------------------------------------------------------------------------------------
# 2. Threshold
# ----------------------------------------------------------------------------------------
class ThresholdWidget(StageWidget):
    """Stages 2-3: global threshold (automatic, adjustable live) and adaptive local threshold.

    *Find threshold* tries the candidate thresholds and keeps the one whose segment shells are
    darkest (membranes are dark); the value appears on the slider, and moving the slider
    relabels ``<tomo> labels (global)`` live. *Adaptive threshold* then splits merged vesicles,
    grows partial ones and drops non-vesicles → ``<tomo> labels (adaptive)``.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "2. Threshold"
    run_text = "Find threshold"

    def build(self):
        self.tomogram = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                         exclude_roles=("probability",))
        self.probability = self.layer_combo("Probability", "Image", "Vesicle probability map (Predict)",
                                            roles=("probability",))
        self.threshold = FloatSlider(value=0.9, min=0.5, max=1.0, step=0.005, label="Threshold",
                                     readout=True, tooltip=(
                                         "Probability threshold of the global segmentation. Set by "
                                         "'Find threshold' (darkest segment shells); moving it "
                                         "relabels the global labels live."))
        self.threshold.native.setMinimumWidth(120)
        self.curve_label = Label(value="")
        self.curve_label.native.setWordWrap(True)
        self.adaptive_button = PushButton(text="Adaptive threshold",
                                          tooltip="Split merged vesicles, grow partial ones, drop "
                                                  "non-vesicles (starts from the global labels)")
        self.extra_buttons.append(self.adaptive_button)
        self.main.extend([self.tomogram, self.probability, self.threshold, self.curve_label])
        self.add_fields("adaptive")
        self._curve = None
        self._live = True
        self._pending = None
        self._timer = None
        self.threshold.changed.connect(self._threshold_moved)
        self.adaptive_button.changed.connect(self._adaptive_clicked)
        self.tomogram.changed.connect(self.autoselect)

    def extra_widgets(self):
        self._plot = _ShellPlot() if _HAS_MPL else _NoPlot()
        return [self._plot.canvas] if _HAS_MPL else []

    def missing_hint(self, what):
        return "run Predict first (or open a probability map)" if what == "probability" else super().missing_hint(what)

    def _inputs(self):
        layer = self.require(self.tomogram, "tomogram")
        prob_layer = self.require(self.probability, "probability")
        tomo = _tomogram_array(layer)
        prob = _tomogram_array(prob_layer)
        if tomo.shape != prob.shape:
            raise ValueError(f"tomogram {tomo.shape} and probability {prob.shape} differ in shape; "
                             "pick the probability map of this tomogram")
        vs = voxel_size_of(layer) or voxel_size_of(prob_layer)
        return layer, tomo, prob, vs

    def run(self):
        """Find the global threshold automatically (darkest shell) and label the segments."""
        layer, tomo, prob, vs = self._inputs()
        name = base_name(layer)
        p = self.params()

        def work(progress):
            from cryoves.threshold import global_threshold

            return global_threshold(_materialize(tomo), _materialize(prob), thresholds=p.thresholds,
                                    connectivity=p.connectivity, progress=progress)

        def done(res):
            self._curve = (np.asarray(res.thresholds), np.asarray(res.shell_means))
            self._plot.show(*self._curve, res.threshold)
            self._live = False
            try:
                self.threshold.value = float(res.threshold)
            finally:
                self._live = True
            self._write_global(res.labels, vs, name, res.threshold)
            self.curve_label.value = (f"Chosen {res.threshold:.3f}: darkest segment shells "
                                      f"({res.n_segments} segments)")
            return f"Global threshold {res.threshold:.3f}: {res.n_segments} segments"

        self.runner.start(work, done, "Global threshold")

    def _write_global(self, labels, vs, name, t):
        add_or_update(self.viewer, (labels, labels_kwargs(
            vs, layer_name(name, "labels_global"), "labels_global", name, meta={"cryoves_threshold": float(t)}),
            "labels"))

    # live update of the global labels -------------------------------------------------
    def _threshold_moved(self, value):
        if not self._live:
            return
        self._plot.mark(float(value))
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer(self)
            self._timer.setSingleShot(True)
            self._timer.setInterval(250)
            self._timer.timeout.connect(self._relabel)
        self._timer.start()

    def _relabel(self):
        if self.runner.busy:  # try again when the running task is over
            self._timer.start()
            return
        try:
            layer, tomo, prob, vs = self._inputs()
        except ValueError:
            return
        t = float(self.threshold.value)
        name = base_name(layer)
        connectivity = int(self.fields["connectivity"].value)

        def work(progress):
            from cryoves.threshold import global_threshold

            return global_threshold(_materialize(tomo), _materialize(prob), thresholds=[t],
                                    connectivity=connectivity, progress=progress)

        def done(res):
            self._write_global(res.labels, vs, name, t)
            self.curve_label.value = f"Threshold {t:.3f}: {res.n_segments} segments"
            return f"Global labels at {t:.3f}: {res.n_segments} segments"

        self.runner.start(work, done, "Relabel", quiet=True)

    # adaptive ----------------------------------------------------------------------------
    def _adaptive_clicked(self, *_):
        try:
            self.run_adaptive()
        except Exception as exc:  # noqa: BLE001
            from napari.utils.notifications import show_error

            from cryoves.napari._runner import describe_error

            self.status.value = describe_error(exc)
            show_error(f"cryoves: {describe_error(exc)}")

    def run_adaptive(self):
        """Adaptive local threshold on the current global labels → ``<tomo> labels (adaptive)``."""
        layer, tomo, prob, _ = self._inputs()
        vs = self.voxel_size_from(layer)
        name = base_name(layer)
        gname = layer_name(name, "labels_global")
        if gname not in self.viewer.layers:
            raise ValueError("no global labels yet: press 'Find threshold' first")
        glayer = self.viewer.layers[gname]
        labels = np.asarray(glayer.data)
        t = float(glayer.metadata.get("cryoves_threshold", self.threshold.value))
        kw = adaptive_kwargs(self.params())

        def work(progress):
            from cryoves.threshold import adaptive_threshold

            return adaptive_threshold(_materialize(prob), labels, t, vs, progress=progress, **kw)

        def done(lab):
            add_or_update(self.viewer, (lab, labels_kwargs(vs, layer_name(name, "labels_adaptive"),
                                                           "labels_adaptive", name), "labels"))
            glayer.visible = False
            n = int(len(np.unique(lab)) - (1 if (lab == 0).any() else 0))
            return f"Adaptive threshold: {n} segments"

        self.runner.start(work, done, "Adaptive threshold")


try:  # the plots are optional: without matplotlib the widgets work, the numbers are still shown
    import matplotlib  # noqa: F401

    _HAS_MPL = True
except ImportError:  # pragma: no cover - matplotlib is in cryoves[napari]
    _HAS_MPL = False


class _NoPlot:
    """Stands in for a plot when matplotlib is not installed (does nothing)."""

    canvas = None

    def show(self, *args):
        pass

    def mark(self, *args):
        pass


class _ShellPlot:
    """Small plot of the mean shell intensity per candidate threshold (why the value was chosen)."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(3.2, 1.5), dpi=90, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.fig)
        self.canvas.setMinimumHeight(120)
        self.canvas.setMaximumHeight(160)
        self.ax = self.fig.add_subplot(111)
        _style_axes(self.ax)
        self.ax.set_xlabel("threshold", fontsize=8)
        self.ax.set_ylabel("shell mean", fontsize=8)
        self.fig.subplots_adjust(left=0.2, right=0.97, bottom=0.28, top=0.95)
        self._line = None
        self.canvas.setVisible(False)

    def show(self, thresholds, means, chosen):
        self.ax.clear()
        _style_axes(self.ax)
        self.ax.plot(thresholds, means, "-o", color="#9ecae1", ms=3, lw=1)
        self.ax.set_xlabel("threshold", fontsize=8)
        self.ax.set_ylabel("shell mean", fontsize=8)
        self._line = self.ax.axvline(chosen, color="#ffd700", lw=1.2)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    def mark(self, value):
        if self._line is not None:
            self._line.set_xdata([value, value])
            self.canvas.draw_idle()


def _style_axes(ax):
    ax.set_facecolor("#262930")
    for s in ax.spines.values():
        s.set_color("#aaaaaa")
    ax.tick_params(colors="#dddddd", labelsize=7)
    ax.xaxis.label.set_color("#dddddd")
    ax.yaxis.label.set_color("#dddddd")


# ----------------------------------------------------------------------------------------
# 3. Refine
# ----------------------------------------------------------------------------------------
def _show_vesicles(viewer, table, tomo: str, shape):
    """Write the vesicles Points layer and the vesicle labels rendered from the table."""
    lab, pts = vesicle_layers_data(table, tomo, shape)
    add_or_update(viewer, lab)
    layer = add_or_update(viewer, pts)
    set_thick_slicing(viewer, layer)
    return layer


class RefineWidget(StageWidget):
    """Stage 4: fit every segment as a sphere by its radial profile → vesicles Points + labels.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "3. Refine spheres"
    run_text = "Fit spheres"

    def build(self):
        self.tomogram = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                         exclude_roles=("probability",))
        self.labels = self.layer_combo("Segments", "Labels", "Label volume to start from (adaptive or "
                                       "global threshold)", roles=("labels_adaptive", "labels_global"),
                                       exclude_roles=("vesicle_labels",))
        self.main.extend([self.tomogram, self.labels])
        self.add_fields("refine")
        self.tomogram.changed.connect(self.autoselect)

    def missing_hint(self, what):
        return "run the Threshold widget first" if what == "segments" else super().missing_hint(what)

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        seg = self.require(self.labels, "segments")
        tomo = _tomogram_array(layer)
        labels = np.asarray(seg.data)
        if labels.shape != tomo.shape:
            raise ValueError(f"segments {labels.shape} and tomogram {tomo.shape} differ in shape")
        vs = self.voxel_size_from(layer)
        name = base_name(layer)
        kw = refine_kwargs(self.params(), vs)

        def work(progress):
            from cryoves.refine import refine_spheres

            return refine_spheres(_materialize(tomo), labels, vs, progress=progress, **kw)

        def done(table):
            _show_vesicles(self.viewer, table, name, tomo.shape)
            seg.visible = False
            n = int(np.sum(table["status"] == "accepted"))
            return f"{n} spheres fitted ({len(table) - n} segments rejected)"

        self.runner.start(work, done, "Sphere fitting")


# ----------------------------------------------------------------------------------------
# 4. Outliers
# ----------------------------------------------------------------------------------------
class OutlierWidget(StageWidget):
    """Stage 5: Mahalanobis outliers of (thickness, density, radius), previewed live.

    Moving the p-value slider colours the vesicles that would be re-fitted (and removed if
    they stay outliers) in red, in the viewer and in the feature plot. *Apply* runs
    :func:`cryoves.outliers.filter_outliers` and updates the vesicles and vesicle labels.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "4. Outlier filter"
    run_text = "Apply outlier filter"

    def build(self):
        from cryoves.napari._params import _defaults

        self.tomogram = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                         exclude_roles=("probability",))
        self.vesicles = self.layer_combo("Vesicles", "Points", "The fitted vesicles (Refine)",
                                         roles=("vesicles",), exclude_roles=("truth_vesicles",))
        self.p_threshold = FloatSlider(value=float(_defaults()["p_threshold"]), min=0.0,
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
        self.p_threshold.changed.connect(self.preview)
        self.vesicles.changed.connect(self.compute_pvalues)
        self.tomogram.changed.connect(self.autoselect)

    def extra_widgets(self):
        from qtpy.QtWidgets import QAbstractItemView, QTableWidget

        self._plot = _FeaturePlot() if _HAS_MPL else _NoPlot()
        self.flagged_table = QTableWidget(0, 5)
        self.flagged_table.setHorizontalHeaderLabels(["id", "p-value", "radius nm", "thick. nm", "density"])
        self.flagged_table.verticalHeader().setVisible(False)
        self.flagged_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.flagged_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.flagged_table.setToolTip("The vesicles below the p-value threshold; click a row to go to it")
        self.flagged_table.horizontalHeader().setStretchLastSection(True)
        self.flagged_table.setMaximumHeight(130)
        self.flagged_table.setVisible(False)
        self.flagged_table.cellClicked.connect(self._go_to_row)
        return ([self._plot.canvas] if _HAS_MPL else []) + [self.flagged_table]

    def _fill_table(self, flagged, p):
        from qtpy.QtWidgets import QTableWidgetItem

        t = self._table
        rows = np.flatnonzero(flagged)
        rows = rows[np.argsort(p[rows])]
        vs = t.voxel_size or 1.0
        self.flagged_table.setRowCount(len(rows))
        self._table_rows = rows
        for i, r in enumerate(rows):
            vals = [str(int(t["id"][r])), f"{p[r]:.3g}", f"{t['radius'][r] * vs:.1f}",
                    f"{t['thickness'][r] * vs:.2f}", f"{t['density'][r]:.3g}"]
            for j, v in enumerate(vals):
                self.flagged_table.setItem(i, j, QTableWidgetItem(v))
        self.flagged_table.resizeColumnsToContents()
        self.flagged_table.setVisible(len(rows) > 0)

    def _go_to_row(self, row, _col=None):
        """Show the vesicle of a table row: move the slice to it and select its point."""
        layer = self.vesicles.value
        if layer is None or row >= len(getattr(self, "_table_rows", [])):
            return
        i = int(self._table_rows[row])
        world = layer.data_to_world(layer.data[i])
        for ax in self.viewer.dims.not_displayed:
            self.viewer.dims.set_point(ax, float(world[ax]))
        self.viewer.camera.center = tuple(float(w) for w in world)
        layer.selected_data = {i}

    def missing_hint(self, what):
        return "run the Refine widget first" if what == "vesicles" else super().missing_hint(what)

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "_plot"):
            self.compute_pvalues()

    def compute_pvalues(self, *_):
        """p-values of the accepted vesicles of the chosen layer, then the preview."""
        from cryoves.outliers import mahalanobis_pvalues

        layer = self.vesicles.value
        if layer is None:
            self._pvalues, self._table = None, None
            self.summary.value = ""
            return
        table = table_from_points(layer)
        try:
            p = np.asarray(mahalanobis_pvalues(table, features=self.params().features,
                                               robust=bool(self.fields["robust"].value)), dtype=float)
        except Exception as exc:  # noqa: BLE001 - e.g. missing features: say so, no traceback
            from cryoves.napari._runner import describe_error

            self.summary.value = f"p-values unavailable: {describe_error(exc)}"
            self._pvalues, self._table = None, None
            return
        self._pvalues, self._table = p, table
        self.preview()

    def preview(self, *_):
        """Colour the vesicles that the current p-value threshold would refine/remove."""
        layer = self.vesicles.value
        if layer is None or self._pvalues is None or len(layer.data) != len(self._pvalues):
            return
        thr = float(self.p_threshold.value)
        p = self._pvalues
        status = np.asarray(self._table["status"], dtype=str)
        flagged = (status == "accepted") & np.isfinite(p) & (p < thr)
        colors = [STATUS_COLORS["removed"] if f else STATUS_COLORS.get(s, "#ffffff")
                  for f, s in zip(flagged, status)]
        if len(colors):
            layer.border_color = colors
        feats = layer.features.copy()
        feats["pvalue"] = p
        feats["outlier_preview"] = flagged
        layer.features = feats
        n_acc = int(np.sum(status == "accepted"))
        self.summary.value = (f"{int(flagged.sum())} of {n_acc} vesicles have p < {thr:.2f} (red): they "
                              "will be re-fitted with a larger box and removed if still outliers.")
        self._plot.show(self._table, p, flagged)
        self._fill_table(flagged, p)

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        pts = self.require(self.vesicles, "vesicles")
        tomo = _tomogram_array(layer)
        vs = self.voxel_size_from(layer)
        table = table_from_points(pts)
        if table.voxel_size is None:
            table.voxel_size = vs
        thr = float(self.p_threshold.value)
        kw = outlier_kwargs(self.params())
        name = base_name(layer)

        def work(progress):
            from cryoves.outliers import filter_outliers

            return filter_outliers(_materialize(tomo), table, vs, p_threshold=thr, progress=progress, **kw)

        def done(result):
            new = result.table if hasattr(result, "table") else result
            _show_vesicles(self.viewer, new, name, tomo.shape)
            self.compute_pvalues()
            n_acc = int(np.sum(new["status"] == "accepted"))
            n_before = int(np.sum(table["status"] == "accepted"))
            return f"Outlier filter: {n_acc} vesicles kept, {n_before - n_acc} removed"

        self.runner.start(work, done, "Outlier filter")


class _FeaturePlot:
    """Scatter plots of the vesicle features; preview outliers in red."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(3.4, 2.6), dpi=90, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.fig)
        self.canvas.setMinimumHeight(220)
        self.canvas.setMaximumHeight(260)
        self.axes = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.16, right=0.98, bottom=0.2, top=0.95, wspace=0.45)
        self.canvas.setVisible(False)

    def show(self, table, p, flagged):
        acc = np.asarray(table["status"], dtype=str) == "accepted"
        vs = table.voxel_size or 1.0
        unit = "nm" if table.voxel_size else "vox"
        r = table["radius"] * vs
        t = table["thickness"] * vs
        d = table["density"]
        pairs = [(r, t, f"radius ({unit})", f"thickness ({unit})"), (r, d, f"radius ({unit})", "density")]
        for ax, (x, y, xl, yl) in zip(self.axes, pairs):
            ax.clear()
            _style_axes(ax)
            keep = acc & ~flagged
            ax.scatter(x[keep], y[keep], s=9, c="#ffd700", alpha=0.8, lw=0)
            ax.scatter(x[acc & flagged], y[acc & flagged], s=14, c="#ff3030", lw=0)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()


# ----------------------------------------------------------------------------------------
# 5. Export
# ----------------------------------------------------------------------------------------
class ExportWidget(StageWidget):
    """Write the vesicles: labels (MRC), table (CSV, STAR), IMOD model, Pyto labels.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "5. Export"
    run_text = "Export"

    def build(self):
        self.vesicles = self.layer_combo("Vesicles", "Points", "The vesicles to export",
                                         roles=("vesicles",), exclude_roles=("truth_vesicles",))
        self.folder = FileEdit(mode="d", value=str(Path.home()), label="Folder",
                               tooltip="Output folder (created if missing)")
        self.basename = LineEdit(value="", label="File name",
                                 tooltip="Start of every file name (default: the tomogram's name)")
        self.do_labels = optional_checkbox("Vesicle labels (.mrc)", True,
                                           "uint16 label volume, one id per vesicle, voxel size in the header")
        self.do_csv = optional_checkbox("Vesicle table (.csv)", True, "Every vesicle with voxel and nm columns")
        self.do_star = optional_checkbox("STAR file (.star)", False, "RELION-style coordinates (Å) for "
                                         "subtomogram averaging")
        self.do_mod = optional_checkbox("IMOD model (.mod)", False, "One sphere per vesicle, for 3dmod")
        self.do_pyto = optional_checkbox("Pyto labels (.mrc)", False,
                                         "Vesicles numbered from 10 upward, as Pyto expects")
        self.overwrite = optional_checkbox("Overwrite existing files", False,
                                           "Replace files of the same name in the folder")
        self.main.extend([self.vesicles, self.folder, self.basename, self.do_labels, self.do_csv,
                          self.do_star, self.do_mod, self.do_pyto, self.overwrite])

    def missing_hint(self, what):
        return "run Refine (or the full pipeline) first"

    def run(self):
        pts = self.require(self.vesicles, "vesicles")
        table = table_from_points(pts)
        shape = pts.metadata.get(SHAPE_KEY)
        if shape is None:
            tname = base_name(pts)
            if tname in self.viewer.layers:
                shape = self.viewer.layers[tname].data.shape
        folder = Path(str(self.folder.value)).expanduser()
        base = self.basename.value.strip() or base_name(pts).replace(" ", "_")
        todo = {k: bool(w.value) for k, w in (("labels", self.do_labels), ("csv", self.do_csv),
                                              ("star", self.do_star), ("mod", self.do_mod),
                                              ("pyto", self.do_pyto))}
        if not any(todo.values()):
            raise ValueError("nothing to export: tick at least one format")
        if (todo["labels"] or todo["pyto"] or todo["mod"]) and shape is None:
            raise ValueError("the tomogram's shape is unknown: keep its layer open to export labels")
        todo["overwrite"] = bool(self.overwrite.value)

        def work(progress):
            return export_vesicles(table, folder, base, shape, progress=progress, **todo)

        def done(paths):
            from napari.utils.notifications import show_info

            show_info("cryoves: wrote " + ", ".join(Path(p).name for p in paths) + f" in {folder}")
            return f"Wrote {len(paths)} files to {folder}"

        self.runner.start(work, done, "Export")


def export_vesicles(table, folder, base, shape, *, labels=True, csv=True, star=False, mod=False,
                    pyto=False, overwrite=False, progress=None) -> list[str]:
    """Write a vesicle table in the chosen formats with :mod:`cryoves.io`.

    Parameters
    ----------
    table : VesicleTable
    folder : path
        Output folder (created).
    base : str
        File-name stem.
    shape : (Z, Y, X) or None
        Tomogram shape (needed for label volumes and the IMOD model).
    labels, csv, star, mod, pyto : bool
        Formats to write.
    overwrite : bool
        Replace existing files (otherwise an existing file is an error).
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    list of str
        The written files.
    """
    from cryoves import io
    from cryoves.table import render_labels

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [k for k, v in (("labels", labels), ("csv", csv), ("star", star), ("mod", mod), ("pyto", pyto)) if v]
    names = {"labels": f"{base}_vesicle_labels.mrc", "csv": f"{base}_vesicles.csv",
             "star": f"{base}_vesicles.star", "mod": f"{base}_vesicles.mod", "pyto": f"{base}_pyto_labels.mrc"}
    if not overwrite:
        exist = [names[j] for j in jobs if (folder / names[j]).exists()]
        if exist:
            raise FileExistsError(f"{', '.join(exist)} already exist in {folder}; tick 'Overwrite' or "
                                  "choose another file name")
    out = []
    vs = table.voxel_size
    for i, job in enumerate(jobs):
        if progress is not None:
            progress("export", i, len(jobs))
        p = folder / names[job]
        if job == "labels":
            io.write_labels_mrc(p, render_labels(table, shape), vs, overwrite=overwrite)
        elif job == "csv":
            io.write_vesicles_csv(p, table, overwrite=overwrite)
        elif job == "star":
            io.write_star(p, table, tomo_name=base, overwrite=overwrite)
        elif job == "mod":
            io.write_imod_model(p, table, tuple(shape), vs, overwrite=overwrite)
        else:
            io.write_pyto_labels(p, table, tuple(shape), vs, overwrite=overwrite)
        out.append(str(p))
    if progress is not None:
        progress("export", len(jobs), len(jobs))
    return out


# ----------------------------------------------------------------------------------------
# Full pipeline
# ----------------------------------------------------------------------------------------
class PipelineWidget(StageWidget):
    """All stages on the chosen tomogram with one button; the same layers as stage by stage.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "Find vesicles (full pipeline)"
    run_text = "Find vesicles"

    def build(self):
        from cryoves.napari._params import SPECS, make_field

        self.tomogram = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                         exclude_roles=("probability",))
        _weights_widgets(self)
        self.probability = self.layer_combo(
            "Reuse probability", "Image", "Optional: an existing probability map of this tomogram; the "
            "network is then skipped", nullable=True, name="probability")
        self.main.extend([self.tomogram, self.weights, self.weights_label, self.voxel_size,
                          self.rescale_label])
        groups = (("Prediction", ("tile", "tta")),
                  ("Threshold", ("connectivity", "adaptive", "min_radius_nm", "z_split", "extent_split",
                                 "extent_lo", "extent_hi", "grow_min")),
                  ("Sphere fitting", ("refine_min_radius_nm", "refine_max_radius_nm", "refine_max_iter",
                                      "sigma_vox", "radius_method", "capture")),
                  ("Outliers", ("outliers", "p_threshold", "outlier_max_iter", "grow_vox",
                                "remove_overlaps", "robust", "max_rounds")))
        self.mask = self.layer_combo(
            "Region mask", "Labels", "Optional: only look for vesicles inside this region (non-zero "
            "voxels), e.g. the presynaptic cytoplasm; same shape as the tomogram", nullable=True,
            exclude_roles=("labels_global", "labels_adaptive", "vesicle_labels", "truth_labels"), name="mask")
        self.advanced.extend([self.probability, self.mask])
        for title, names in groups:
            self.advanced.append(Label(value=f"<b>{title}</b>", label=""))
            for name in names:
                assert name in SPECS
                self.fields[name] = make_field(name)
                self.advanced.append(self.fields[name])
        self.tomogram.changed.connect(lambda *_: _update_voxel_field(self))
        self.weights.changed.connect(lambda *_: _update_weights_info(self))
        self.voxel_size.changed.connect(lambda *_: _voxel_size_edited(self))
        _update_weights_info(self)

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "voxel_size"):
            _update_voxel_field(self)

    def autoselect(self, *_):
        # never pre-select a probability map: reusing one is an explicit choice
        pass

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        data = _tomogram_array(layer)
        vs = _checked_voxel_size(self, layer)
        prob_layer = self.probability.value
        prob = None
        if prob_layer is not None:
            prob = _tomogram_array(prob_layer)
            if prob.shape != data.shape:
                raise ValueError(f"probability {prob.shape} and tomogram {data.shape} differ in shape")
        mask = None
        if self.mask.value is not None:
            mask = np.asarray(self.mask.value.data)
            if mask.shape != data.shape:
                raise ValueError(f"region mask {mask.shape} and tomogram {data.shape} differ in shape")
        path = _weights_path(self.weights.value)
        if prob is None and self._model_vs is None:
            raise ValueError(self.weights_label.value or "choose a weights file")
        params = self.params()
        _set_voxel_size(layer, vs)
        name = base_name(layer)

        def pipeline(progress):
            from cryoves.pipeline import segment

            model = load_model_cached(path) if prob is None else None
            return segment(_materialize(data), vs, model, params=params, mask=mask,
                           probability=None if prob is None else _materialize(prob), progress=progress)

        def work(progress):
            if prob is not None:  # no network: run right here
                return pipeline(progress)
            return run_in_tf_thread(pipeline, progress)

        def done(result):
            show_segmentation(self.viewer, result, name, data.shape, vs)
            line = f"{result.n_accepted} vesicles found"
            if result.n_removed:
                line += f" ({result.n_removed} candidates rejected, kept as hidden points for review)"
            if np.isfinite(result.threshold):
                line += f"; global threshold {result.threshold:.2f}"
            return line

        self.runner.start(work, done, "Vesicle segmentation")


def show_segmentation(viewer, result, tomo: str, shape, voxel_size: float) -> None:
    """Add every layer of a :class:`cryoves.pipeline.SegmentationResult` (same layers as the stages)."""
    if result.probability is not None:
        add_or_update(viewer, (result.probability, image_kwargs(
            voxel_size, layer_name(tomo, "probability"), role="probability", tomogram=tomo), "image"))
    stage = getattr(result, "stage_labels", None) or {}
    for key, role in (("global", "labels_global"), ("adaptive", "labels_adaptive")):
        lab = stage.get(key)
        if lab is None:
            continue
        extra = {"cryoves_threshold": float(result.threshold)} if key == "global" and result.threshold is not None \
            else {}
        add_or_update(viewer, (lab, labels_kwargs(voxel_size, layer_name(tomo, role), role, tomo,
                                                  meta=extra, visible=False), "labels"))
    _show_vesicles(viewer, result.table, tomo, shape)
