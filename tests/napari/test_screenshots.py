"""Screenshots of the plugin in action, saved to docs/img/napari_*.png (used by docs/napari.md).

Run: ``python -m pytest -q tests/napari/test_screenshots.py`` (pytest-xvfb provides the display).
The full-pipeline screenshot uses the real network when weights are available (default,
else the CryoVesNet reference weights), which also checks that TensorFlow and napari's
OpenGL canvas live in one process; otherwise the pipeline reuses a ground-truth-derived
probability map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import os
import tempfile

import pytest
from napari_helpers import REFERENCE_WEIGHTS, click, dock, gt_probability, wait_done

pytestmark = [pytest.mark.napari, pytest.mark.slow]

# The PNGs go to docs/img when CRYOVES_UPDATE_DOCS=1 (to refresh the documentation), else to a
# temporary folder, so an ordinary test run leaves the working tree untouched.
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
IMG = DOCS_IMG if os.environ.get("CRYOVES_UPDATE_DOCS") == "1" else Path(tempfile.mkdtemp(prefix="cryoves_shots_"))
NAME = "sample tomogram"


def _weights():
    from cryoves.model import default_weights_path

    try:
        return str(default_weights_path())
    except FileNotFoundError:
        return str(REFERENCE_WEIGHTS) if REFERENCE_WEIGHTS.is_file() else None


def _viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 920)
    viewer.open_sample("cryoves", "synapse")
    return viewer


def _centre_slice(viewer, z=None):
    layer = viewer.layers[NAME]
    zc = layer.data.shape[0] // 2 if z is None else z
    viewer.dims.set_point(0, zc * layer.scale[0])
    viewer.reset_view()


def _shot(viewer, qtbot, name):
    qtbot.wait(400)
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / name
    img = viewer.screenshot(str(path), canvas_only=False, flash=False)
    assert path.is_file() and img.shape[0] > 400 and img.shape[1] > 800
    assert img[..., :3].std() > 5  # not a blank window
    return path


def test_screenshot_full_pipeline(make_napari_viewer, qtbot):
    from cryoves.napari._pipeline import PipelineWidget

    viewer = _viewer(make_napari_viewer)
    pw = dock(viewer, PipelineWidget)
    weights = _weights()
    if weights is not None:
        pw.panel.weights.value = weights
    else:  # no network: reuse a probability map derived from the ground truth
        from cryoves._resources import sample_data_dir
        from cryoves.io import read_labels
        from cryoves.napari._layers import image_kwargs, layer_name

        lab, vs = read_labels(sample_data_dir() / "labels_truth.mrc")
        prob = viewer.add_image(gt_probability(lab), **image_kwargs(
            vs, layer_name(NAME, "probability"), role="probability", tomogram=NAME))
        pw.probability.value = prob
    click(qtbot, pw.run_button)
    assert wait_done(qtbot, pw, timeout=500_000) == "ok", pw.status.value
    viewer.layers[f"{NAME} probability"].visible = False
    viewer.layers.selection.active = viewer.layers[f"{NAME} vesicles"]
    _centre_slice(viewer)
    _shot(viewer, qtbot, "napari_pipeline.png")

    viewer.dims.ndisplay = 3
    viewer.layers[f"{NAME} vesicles"].visible = False
    viewer.layers[f"{NAME} vesicle labels"].opacity = 1.0
    viewer.layers.selection.active = viewer.layers[f"{NAME} vesicle labels"]
    viewer.layers[NAME].visible = False
    viewer.reset_view()
    viewer.scene.camera.angles = (10, -35, 55)
    _shot(viewer, qtbot, "napari_3d.png")


def test_screenshot_stages(make_napari_viewer, qtbot):
    from cryoves._resources import sample_data_dir
    from cryoves.io import read_labels
    from cryoves.napari._layers import image_kwargs, layer_name
    from cryoves.napari._outliers import OutlierWidget
    from cryoves.napari._refine import RefineWidget
    from cryoves.napari._threshold import ThresholdWidget

    viewer = _viewer(make_napari_viewer)
    lab, vs = read_labels(sample_data_dir() / "labels_truth.mrc")
    viewer.add_image(gt_probability(lab), **image_kwargs(vs, layer_name(NAME, "probability"),
                                                         role="probability", tomogram=NAME))
    tw = dock(viewer, ThresholdWidget)
    click(qtbot, tw.run_button)
    assert wait_done(qtbot, tw) == "ok"
    viewer.layers[f"{NAME} probability"].visible = False
    _centre_slice(viewer)
    _shot(viewer, qtbot, "napari_threshold.png")

    click(qtbot, tw.adaptive_button)
    assert wait_done(qtbot, tw) == "ok"
    viewer.window.remove_dock_widget(tw)
    rw = dock(viewer, RefineWidget)
    click(qtbot, rw.run_button)
    assert wait_done(qtbot, rw) == "ok"
    viewer.window.remove_dock_widget(rw)
    ow = dock(viewer, OutlierWidget)
    ow.p_threshold.value = 0.2
    viewer.layers.selection.active = viewer.layers[f"{NAME} vesicles"]
    _centre_slice(viewer)
    _shot(viewer, qtbot, "napari_outliers.png")
    assert "vesicles have p <" in ow.summary.value  # the live preview is on the picture
