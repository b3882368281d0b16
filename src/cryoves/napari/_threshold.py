"""2. Threshold: the global threshold (automatic, adjustable live) and the adaptive local threshold.

Both buttons run the full pipeline's stage functions (:func:`cryoves.pipeline.global_stage`,
:func:`cryoves.pipeline.adaptive_stage`), so the labels are those of the one-button pipeline
with the same parameters.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import FloatSlider, Label, PushButton

from cryoves.napari._base import StageWidget, check_probability, materialize, tomogram_array
from cryoves.napari._layers import add_or_update, base_name, labels_kwargs, layer_name, voxel_size_of
from cryoves.napari._plots import shell_plot

__all__ = ["ThresholdWidget"]


class ThresholdWidget(StageWidget):
    """Stage 2: global threshold (automatic, adjustable live), then the adaptive local threshold.

    *Find threshold* tries the candidate thresholds and keeps the one whose segment shells are
    darkest (membranes are dark), adds (robust rule) the vesicles a less sure network marks
    below it and the large vesicles of the *Large-vesicle map* (Predict's second layer), each
    where the tomogram shows a membrane; the value appears on the slider, and moving the slider
    relabels ``<tomo> labels (global)`` live at that value. *Adaptive threshold* then splits
    merged vesicles, grows partial ones and drops non-vesicles → ``<tomo> labels (adaptive)``.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "2. Threshold"
    run_text = "Find threshold"

    def build(self):
        self.tomogram = self.tomogram_combo()
        self.probability = self.layer_combo("Probability", "Image", "Vesicle probability map (Predict), "
                                            "values 0..1", roles=("probability",),
                                            exclude_roles=("probability_large",))
        self.large = self.layer_combo(
            "Large-vesicle map", "Image", "Optional: the large-vesicle pass of Predict (layer '... probability "
            "(large vesicles)'); its regions become vesicles where a membrane is found. Empty: no large-vesicle "
            "candidates (as the full pipeline with a reused probability map)",
            roles=("probability_large",), nullable=True, name="large")
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
        self.main.extend([self.tomogram, self.probability, self.large, self.threshold, self.curve_label])
        self.add_fields("adaptive")
        self._live = True
        self._timer = None
        self.threshold.changed.connect(self._threshold_moved)
        self.adaptive_button.changed.connect(self.guarded(self.run_adaptive))

    def extra_widgets(self):
        self._plot = shell_plot()
        return [self._plot.canvas] if self._plot.canvas is not None else []

    def missing_hint(self, what):
        return "run Predict first (or open a probability map)" if what == "probability" else super().missing_hint(what)

    def _inputs(self):
        """(tomogram layer, tomogram, probability, large-vesicle map or None, voxel size), checked."""
        layer = self.require(self.tomogram, "tomogram")
        prob_layer = self.require(self.probability, "probability")
        tomo = tomogram_array(layer)
        prob = check_probability(prob_layer)
        if tomo.shape != prob.shape:
            raise ValueError(f"tomogram {tomo.shape} and probability {prob.shape} differ in shape; "
                             "pick the probability map of this tomogram")
        large = None
        if self.large.value is not None:
            large = check_probability(self.large.value)
            if large.shape != tomo.shape:
                raise ValueError(f"tomogram {tomo.shape} and large-vesicle map {large.shape} differ in shape; "
                                 "pick the map of this tomogram (or none)")
        vs = voxel_size_of(layer) or voxel_size_of(prob_layer)
        if vs is None:
            vs = self.voxel_size_from(layer)  # unknown: a clear message
        return layer, tomo, prob, large, vs

    def _global(self, params, done, desc, quiet=False):
        """Run :func:`cryoves.pipeline.global_stage` with ``params`` in the worker, then ``done``."""
        layer, tomo, prob, large, vs = self._inputs()
        name = base_name(layer)

        def work(progress):
            from cryoves.pipeline import global_stage

            return global_stage(materialize(tomo), materialize(prob), vs, params,
                                large=None if large is None else materialize(large), progress=progress)

        def finish(res):
            self._write_global(res.labels, vs, name, res.threshold)
            return done(res)

        self.runner.start(work, finish, desc, quiet=quiet)

    def run(self):
        """Find the global threshold automatically (darkest shell) and label the segments."""
        def done(res):
            self._plot.show(np.asarray(res.thresholds), np.asarray(res.shell_means), res.threshold)
            self._live = False
            try:
                self.threshold.value = float(res.threshold)
            finally:
                self._live = True
            self.curve_label.value = (f"Chosen {res.threshold:.3f}: darkest segment shells "
                                      f"({res.n_segments} segments)")
            return f"Global threshold {res.threshold:.3f}: {res.n_segments} segments"

        self._global(self.params(), done, "Global threshold")

    def _write_global(self, labels, vs, name, t):
        add_or_update(self.viewer, (labels, labels_kwargs(
            vs, layer_name(name, "labels_global"), "labels_global", name, meta={"cryoves_threshold": float(t)}),
            "labels"))

    # live update of the global labels -------------------------------------------------
    def _threshold_moved(self, value):
        if not self._live or self.closed:
            return
        self._plot.mark(float(value))
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer(self)
            self._timer.setSingleShot(True)
            self._timer.setInterval(250)
            self._timer.timeout.connect(self._relabel)
        self._timer.start()

    def on_close(self):
        if self._timer is not None:
            self._timer.stop()

    def _relabel(self):
        if self.closed:
            return
        if self.runner.busy:  # try again when the running task is over
            self._timer.start()
            return
        t = float(self.threshold.value)

        def done(res):
            self.curve_label.value = f"Threshold {t:.3f}: {res.n_segments} segments"
            return f"Global labels at {t:.3f}: {res.n_segments} segments"

        try:  # the global stage at the slider's value (every other parameter as Find threshold)
            self._global(self.params().replace(thresholds=(t,)), done, "Relabel", quiet=True)
        except ValueError:  # inputs missing or invalid meanwhile: the next click says why
            return

    # adaptive ----------------------------------------------------------------------------
    def run_adaptive(self):
        """Adaptive local threshold on the current global labels → ``<tomo> labels (adaptive)``."""
        layer, tomo, prob, _, _ = self._inputs()
        vs = self.voxel_size_from(layer)
        name = base_name(layer)
        gname = layer_name(name, "labels_global")
        if gname not in self.viewer.layers:
            raise ValueError("no global labels yet: press 'Find threshold' first")
        glayer = self.viewer.layers[gname]
        labels = np.asarray(glayer.data)
        t = float(glayer.metadata.get("cryoves_threshold", self.threshold.value))
        params = self.params()

        def work(progress):
            from cryoves.pipeline import adaptive_stage

            return adaptive_stage(materialize(prob), labels, t, vs, params, progress=progress)

        def done(lab):
            add_or_update(self.viewer, (lab, labels_kwargs(vs, layer_name(name, "labels_adaptive"),
                                                           "labels_adaptive", name), "labels"))
            glayer.visible = False
            n = int(len(np.unique(lab)) - (1 if (lab == 0).any() else 0))
            return f"Adaptive threshold: {n} segments"

        self.runner.start(work, done, "Adaptive threshold")
