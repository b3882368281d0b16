"""The stage widgets, one after the other, give the one-button pipeline's result.

Both routes call the same stage functions of :mod:`cryoves.pipeline` with the same
parameters; this runs them on a small simulated tomogram whose large vesicles only the
large-vesicle pass finds, so a stage route without that pass (or with any other difference)
gives another vesicle table.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import click, dock, wait_done

pytestmark = pytest.mark.napari

@pytest.fixture(scope="module")
def large_simulation():
    from test_pipeline import large_vesicle_simulation  # tests/: on the path (its conftest.py)

    return large_vesicle_simulation()


def _same_table(got, want):
    assert got.ids.tolist() == want.ids.tolist()
    for col in ("status", "stage", "note"):
        assert list(got[col]) == list(want[col]), col
    for col in ("z", "y", "x", "radius", "thickness", "density", "pvalue"):
        np.testing.assert_allclose(np.asarray(got[col], float), np.asarray(want[col], float), rtol=1e-6,
                                   atol=1e-6, equal_nan=True, err_msg=col)


@pytest.mark.slow
def test_stage_widgets_give_the_pipelines_table(make_napari_viewer, qtbot, large_simulation, weights_path):
    from cryoves.napari._layers import image_kwargs, table_from_points
    from cryoves.napari._outliers import OutlierWidget
    from cryoves.napari._predict import PredictWidget
    from cryoves.napari._refine import RefineWidget
    from cryoves.napari._threshold import ThresholdWidget
    from cryoves.pipeline import SegmentParams, segment

    sim = large_simulation
    want = segment(sim.tomogram, sim.voxel_size, weights_path)
    # the large-vesicle pass matters here: without it (a given probability map skips it) fewer
    # vesicles are found
    without = segment(sim.tomogram, sim.voxel_size, probability=want.probability)
    assert want.params == SegmentParams() and want.n_accepted >= without.n_accepted + 1

    viewer = make_napari_viewer()
    viewer.add_image(sim.tomogram, **image_kwargs(sim.voxel_size, "sim", data=sim.tomogram))
    steps = [(PredictWidget, "run_button"), (ThresholdWidget, "run_button"), (ThresholdWidget, "adaptive_button"),
             (RefineWidget, "run_button"), (OutlierWidget, "run_button")]
    widgets = {}
    for cls, button in steps:
        if cls not in widgets:
            widgets[cls] = dock(viewer, cls)
            if cls is PredictWidget:
                widgets[cls].panel.weights.value = weights_path
        w = widgets[cls]
        click(qtbot, getattr(w, button))
        assert wait_done(qtbot, w, timeout=300_000) == "ok", w.status.value
    got = table_from_points(viewer.layers["sim vesicles"])
    _same_table(got, want.table)
    np.testing.assert_array_equal(viewer.layers["sim probability"].data, want.probability)
    assert viewer.layers["sim labels (global)"].metadata["cryoves_threshold"] == pytest.approx(want.threshold)
    # the large pass's map is a layer of its own, used by the Threshold widget
    large = viewer.layers["sim probability (large vesicles)"]
    assert widgets[ThresholdWidget].large.value is large and not large.visible

    # the one-button pipeline reusing both maps of that prediction gives the same table again;
    # reusing the probability map alone, the table without the large-vesicle pass
    from cryoves.napari._pipeline import PipelineWidget

    pw = dock(viewer, PipelineWidget)
    pw.probability.value = viewer.layers["sim probability"]
    for reuse_large, expected in ((large, want.table), (None, without.table)):
        pw.large.value = reuse_large
        click(qtbot, pw.run_button)
        assert wait_done(qtbot, pw) == "ok", pw.status.value
        _same_table(table_from_points(viewer.layers["sim vesicles"]), expected)
    assert "sim probability (large vesicles)" in viewer.layers  # kept: it still pairs with the probability map
