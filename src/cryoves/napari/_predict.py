"""1. Predict: the U-Net probability map of a tomogram → layer ``<tomo> probability``, and the
large-vesicle pass → layer ``<tomo> probability (large vesicles)``."""

from __future__ import annotations

from cryoves.napari._base import StageWidget, materialize, tomogram_array
from cryoves.napari._layers import add_or_update, base_name, image_kwargs, layer_name
from cryoves.napari._service import get_model, run_in_tf_thread
from cryoves.napari._weights_panel import WeightsPanel

__all__ = ["PredictWidget", "show_prediction", "show_large_map"]


def show_prediction(viewer, tomo: str, voxel_size: float, probability, large=None) -> list[str]:
    """Write the maps of :func:`cryoves.pipeline.predict_stage` as the layers of tomogram ``tomo``.

    ``probability`` goes to ``<tomo> probability``, ``large`` (the large-vesicle pass) as in
    :func:`show_large_map`.

    Returns
    -------
    list of str
        The names of the layers written.
    """
    name = layer_name(tomo, "probability")
    add_or_update(viewer, (probability, image_kwargs(voxel_size, name, role="probability", tomogram=tomo), "image"))
    large_name = show_large_map(viewer, tomo, voxel_size, large)
    return [name] + ([large_name] if large_name else [])


def show_large_map(viewer, tomo: str, voxel_size: float, large) -> str | None:
    """Write the large-vesicle pass's map to the hidden layer ``<tomo> probability (large vesicles)``
    (the Threshold widget picks it up); when ``large`` is ``None``, remove an older layer of that
    name, so that it never pairs with a new probability map. Returns the name written, or None."""
    name = layer_name(tomo, "probability_large")
    if large is None:
        if name in viewer.layers:
            viewer.layers.remove(name)
        return None
    add_or_update(viewer, (large, image_kwargs(voxel_size, name, role="probability_large", tomogram=tomo,
                                               visible=False), "image"))
    return name


class PredictWidget(StageWidget):
    """Stage 1: U-Net probability map of the chosen tomogram → layer ``<tomo> probability``.

    With the large-vesicle pass on (:attr:`cryoves.pipeline.SegmentParams.large_scale`, as in
    the full pipeline), its map of large regions goes to the hidden layer ``<tomo> probability
    (large vesicles)``, which the Threshold widget uses. Both come from
    :func:`cryoves.pipeline.predict_stage`, the function the full pipeline runs. The network
    runs in the plugin's TensorFlow thread (:mod:`cryoves.napari._service`).

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
        params = self.params()
        self.panel.record(layer, vs)
        tomo = base_name(layer)

        def predict(progress):
            from cryoves.pipeline import predict_stage

            return predict_stage(materialize(data), vs, get_model(path), params, progress=progress)

        def done(maps):
            names = show_prediction(self.viewer, tomo, vs, *maps)
            return "Probability map: " + " and ".join(names)

        self.runner.start(lambda progress: run_in_tf_thread(predict, progress), done, "Prediction")
