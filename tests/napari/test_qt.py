"""The plugin runs on Qt 6 (what cryoves[napari] installs) without deprecation warnings of ours."""

from __future__ import annotations

import warnings

import pytest
from napari_helpers import click, dock, wait_done

pytestmark = pytest.mark.napari


def test_qt6_binding_and_no_deprecation_banner(make_napari_viewer, qtbot):
    import qtpy
    from napari.utils.notifications import notification_manager

    assert qtpy.API_NAME in ("PyQt6", "PySide6"), f"napari runs on {qtpy.API_NAME}, not Qt 6"
    n_before = len(notification_manager.records)
    viewer = make_napari_viewer(show=True)
    qtbot.wait(200)
    shown = [str(n.message) for n in notification_manager.records[n_before:]]
    assert not [m for m in shown if "deprecated" in m.lower()], shown
    assert viewer.window._qt_window.isVisible()


def test_widgets_raise_no_deprecation_warning(make_napari_viewer, qtbot):
    """Creating every dock widget and running a stage warns of nothing deprecated."""
    import numpy as np

    from cryoves.napari._export import ExportWidget
    from cryoves.napari._layers import image_kwargs, layer_name
    from cryoves.napari._outliers import OutlierWidget
    from cryoves.napari._pipeline import PipelineWidget
    from cryoves.napari._predict import PredictWidget
    from cryoves.napari._refine import RefineWidget
    from cryoves.napari._threshold import ThresholdWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.normal(size=(16, 32, 32)).astype(np.float32), **image_kwargs(2.0, "t"))
    prob = np.zeros((16, 32, 32), np.float32)
    prob[4:12, 8:20, 8:20] = 1.0
    viewer.add_image(prob, **image_kwargs(2.0, layer_name("t", "probability"), role="probability", tomogram="t"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widgets = [dock(viewer, cls) for cls in (PredictWidget, ThresholdWidget, RefineWidget, OutlierWidget,
                                                  ExportWidget, PipelineWidget)]
        tw = widgets[1]
        click(qtbot, tw.run_button)
        assert wait_done(qtbot, tw) == "ok", tw.status.value
        viewer.scene.camera.center = (8.0, 16.0, 16.0)
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and ("cryoves" in w.filename or "camera" in str(w.message))]
    assert not ours, [f"{w.filename}:{w.lineno} {w.message}" for w in ours]
