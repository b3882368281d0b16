"""1. Predict: the U-Net probability map of a tomogram → layer ``<tomo> probability``."""

from __future__ import annotations

from cryoves.napari._base import StageWidget, materialize, tomogram_array
from cryoves.napari._layers import add_or_update, base_name, image_kwargs, layer_name
from cryoves.napari._params import stage_kwargs
from cryoves.napari._service import get_model, run_in_tf_thread
from cryoves.napari._weights_panel import WeightsPanel

__all__ = ["PredictWidget"]


class PredictWidget(StageWidget):
    """Stage 1: U-Net probability map of the chosen tomogram → layer ``<tomo> probability``.

    The network runs in the plugin's TensorFlow thread (:mod:`cryoves.napari._service`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "1. Predict"
    run_text = "Predict"

    def build(self):
        self.tomogram = self.tomogram_combo()
        self.panel = WeightsPanel(self.tomogram)
        self.main.extend([self.tomogram, *self.panel.widgets])
        self.add_fields("predict")

    def reset_choices(self, *_):
        super().reset_choices()
        if hasattr(self, "panel") and not self.closed:
            self.panel.refresh()

    def run(self):
        layer = self.require(self.tomogram, "tomogram")
        data = tomogram_array(layer)
        vs = self.panel.voxel_size_for(layer)
        path = self.panel.require_weights()
        kw = stage_kwargs(self.params(), "predict", vs)
        self.panel.record(layer, vs)
        tomo = base_name(layer)

        def predict(progress):
            from cryoves.predict import predict_probability

            return predict_probability(materialize(data), vs, get_model(path), progress=progress, **kw)

        def done(prob):
            name = layer_name(tomo, "probability")
            add_or_update(self.viewer, (prob, image_kwargs(vs, name, role="probability", tomogram=tomo), "image"))
            return f"Probability map: {name}"

        self.runner.start(lambda progress: run_in_tf_thread(predict, progress), done, "Prediction")
