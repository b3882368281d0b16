"""Every dock widget on the bundled sample, stage by stage and as the full pipeline.

The post-processing widgets get a probability map derived from the ground truth (the network
is not what they test); Predict and the full pipeline run the real network (default weights,
else the CryoVesNet reference weights) on a small crop.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import add_crop_layers, dock, wait_done

from cryoves.napari._layers import TABLE_KEY, table_from_points

pytestmark = pytest.mark.napari

NAME = "sample tomogram"


def _gt_probability(labels):
    from napari_helpers import gt_probability

    return gt_probability(labels)


@pytest.fixture
def sample_viewer(make_napari_viewer, sample):
    """Viewer with the sample opened from File > Open Sample and a GT-derived probability map."""
    from cryoves.napari._layers import image_kwargs, layer_name

    viewer = make_napari_viewer()
    viewer.open_sample("cryoves", "synapse_truth")
    truth = viewer.layers[layer_name(NAME, "truth_labels")].data
    vs = viewer.layers[NAME].metadata["voxel_size_nm"]
    viewer.add_image(_gt_probability(truth), **image_kwargs(vs, layer_name(NAME, "probability"),
                                                              role="probability", tomogram=NAME))
    return viewer


def _check_spatial(layer, vs):
    assert layer.scale == pytest.approx((vs,) * 3)
    assert layer.metadata["voxel_size_nm"] == pytest.approx(vs)


def _match_count(table, truth):
    from cryoves.evaluate import match_vesicles

    m = match_vesicles(table.accepted(), truth)
    return m


def test_stage_by_stage(sample_viewer, qtbot, sample, tmp_path):
    from cryoves.napari._widgets import ExportWidget, OutlierWidget, RefineWidget, ThresholdWidget

    viewer = sample_viewer
    _, _, truth, vs = sample

    # 2. threshold: automatic global value, then adaptive
    tw = dock(viewer, ThresholdWidget)
    assert tw.tomogram.value is viewer.layers[NAME]
    assert tw.probability.value is viewer.layers[f"{NAME} probability"]
    tw._run_clicked()
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    glob = viewer.layers[f"{NAME} labels (global)"]
    _check_spatial(glob, vs)
    assert 0.8 <= tw.threshold.value <= 1.0
    assert glob.metadata["cryoves_threshold"] == pytest.approx(tw.threshold.value)
    tw._adaptive_clicked()
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    adaptive = viewer.layers[f"{NAME} labels (adaptive)"]
    _check_spatial(adaptive, vs)
    n_seg = len(np.unique(adaptive.data)) - 1
    assert abs(n_seg - len(truth)) <= 0.15 * len(truth)

    # 3. refine: picks the adaptive labels, writes points + labels
    rw = dock(viewer, RefineWidget)
    assert rw.labels.value is adaptive
    rw._run_clicked()
    assert wait_done(qtbot, rw) == "ok", rw.status.value
    pts = viewer.layers[f"{NAME} vesicles"]
    vlab = viewer.layers[f"{NAME} vesicle labels"]
    _check_spatial(pts, vs)
    _check_spatial(vlab, vs)
    table = table_from_points(pts)
    assert table.voxel_size == pytest.approx(vs)
    acc = table.accepted()
    np.testing.assert_allclose(pts.size[pts.shown], 2 * acc.radii)
    assert {"radius", "radius_nm", "pvalue", "stage", "status", "thickness", "density"} <= set(pts.features)
    assert set(np.unique(vlab.data)) - {0} == set(acc.ids.tolist())
    m = _match_count(table, truth)
    assert m.f1 >= 0.85 if hasattr(m, "f1") else True
    assert abs(len(acc) - len(truth)) <= 0.15 * len(truth)

    # 4. outliers: live preview, then apply
    ow = dock(viewer, OutlierWidget)
    assert ow.vesicles.value is pts
    ow.p_threshold.value = 0.5
    flagged_05 = int(pts.features["outlier_preview"].sum())
    ow.p_threshold.value = 0.05
    flagged_005 = int(pts.features["outlier_preview"].sum())
    assert flagged_05 >= flagged_005
    assert "vesicles have p <" in ow.summary.value
    assert not ow._plot.canvas.isHidden()
    assert ow.flagged_table.rowCount() == flagged_005
    if flagged_005:
        ow._go_to_row(0)  # clicking a row selects that vesicle and moves the slice to it
        i = int(ow._table_rows[0])
        assert pts.selected_data == {i}
        assert viewer.dims.point[0] == pytest.approx(pts.data[i][0] * vs, abs=vs)
    from cryoves.outliers import filter_outliers
    from cryoves.napari._base import default_of

    ow.p_threshold.value = default_of(filter_outliers, "p_threshold")  # the core's default
    ow._run_clicked()
    assert wait_done(qtbot, ow) == "ok", ow.status.value
    after = table_from_points(viewer.layers[f"{NAME} vesicles"])
    assert np.all(np.isfinite(after.accepted()["pvalue"]))
    assert abs(len(after.accepted()) - len(truth)) <= 0.15 * len(truth)
    assert viewer.layers[f"{NAME} vesicles"] is pts  # updated in place, not duplicated

    # 5. export
    ew = dock(viewer, ExportWidget)
    ew.folder.value = str(tmp_path)
    for box in (ew.do_star, ew.do_mod, ew.do_pyto):
        box.value = True
    ew._run_clicked()
    assert wait_done(qtbot, ew) == "ok", ew.status.value
    from cryoves.io import read_labels, read_vesicles_csv

    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 5
    csv = read_vesicles_csv(next(tmp_path.glob("*_vesicles.csv")))
    assert len(csv.accepted()) == len(after.accepted())
    lab, lvs = read_labels(next(tmp_path.glob("*_vesicle_labels.mrc")))
    assert lvs == pytest.approx(vs) and lab.shape == viewer.layers[NAME].data.shape
    # exporting again without 'Overwrite' is refused with a clear message, nothing raised
    ew._run_clicked()
    assert wait_done(qtbot, ew) == "error"
    assert "already exist" in ew.runner.last_error


def test_threshold_slider_relabels_live(sample_viewer, qtbot):
    from cryoves.napari._widgets import ThresholdWidget

    tw = dock(sample_viewer, ThresholdWidget)
    tw._run_clicked()
    wait_done(qtbot, tw)
    glob = sample_viewer.layers[f"{NAME} labels (global)"]
    before = int((glob.data > 0).sum())
    tw.threshold.value = 0.55
    qtbot.waitUntil(lambda: glob.metadata.get("cryoves_threshold") == pytest.approx(0.55), timeout=30_000)
    wait_done(qtbot, tw)
    assert int((glob.data > 0).sum()) > before  # lower threshold, larger segments
    assert sample_viewer.layers[f"{NAME} labels (global)"] is glob


def test_cancel_and_errors_are_clean(sample_viewer, qtbot):
    from cryoves.napari._widgets import RefineWidget, ThresholdWidget

    viewer = sample_viewer
    tw = dock(viewer, ThresholdWidget)
    tw._run_clicked()
    wait_done(qtbot, tw)
    tw._adaptive_clicked()
    wait_done(qtbot, tw)
    rw = dock(viewer, RefineWidget)
    rw._run_clicked()
    assert rw.runner.busy and rw.cancel_button.enabled
    rw.cancel_button.changed.emit(True)  # the user presses Cancel
    assert wait_done(qtbot, rw) == "cancelled"
    assert f"{NAME} vesicles" not in viewer.layers
    assert rw.run_button.enabled and not rw.cancel_button.enabled
    # napari's own progress bar (activity panel) has a cancel button too
    from napari.utils import progress

    rw._run_clicked()
    bars = [b for b in progress._all_instances if b is rw.runner._pbar]
    assert len(bars) == 1 and bars[0].desc == "Sphere fitting"
    bars[0].cancel()
    assert wait_done(qtbot, rw) == "cancelled"
    assert rw.runner._pbar is None and bars[0] not in progress._all_instances
    # a stage run without its input says what to do, no exception escapes
    viewer.layers.remove(f"{NAME} labels (adaptive)")
    viewer.layers.remove(f"{NAME} labels (global)")
    viewer.layers.remove(f"{NAME} truth labels")
    rw._run_clicked()
    assert "run the Threshold widget first" in rw.status.value
    # an error inside the worker becomes a one-line message
    bad = viewer.add_image(np.zeros((5, 5, 5), np.float32), name="bad", metadata={"voxel_size_nm": 2.0})
    tw.tomogram.value = bad
    tw._run_clicked()
    assert "differ in shape" in tw.status.value


def test_full_pipeline_reusing_probability(sample_viewer, qtbot, sample):
    """One button, same parameters, same layers as stage by stage (probability given: no network)."""
    pytest.importorskip("cryoves.pipeline")
    from cryoves.napari._widgets import PipelineWidget

    viewer = sample_viewer
    _, _, truth, vs = sample
    pw = dock(viewer, PipelineWidget)
    pw.probability.value = viewer.layers[f"{NAME} probability"]
    pw._run_clicked()
    assert wait_done(qtbot, pw) == "ok", pw.status.value
    for suffix in ("labels (global)", "labels (adaptive)", "vesicles", "vesicle labels"):
        _check_spatial(viewer.layers[f"{NAME} {suffix}"], vs)
    table = table_from_points(viewer.layers[f"{NAME} vesicles"])
    assert abs(len(table.accepted()) - len(truth)) <= 0.15 * len(truth)
    assert pw.mask.value is None  # never pre-selected

    # with a region mask: only vesicles inside it
    from cryoves.io import read_labels

    from cryoves._resources import sample_data_dir

    mask, _ = read_labels(sample_data_dir() / "mask.mrc")
    half = np.zeros_like(mask)
    half[:, :, : mask.shape[2] // 2] = 1
    viewer.add_labels(half, name="left half", scale=(vs,) * 3)
    pw.mask.value = viewer.layers["left half"]
    pw._run_clicked()
    assert wait_done(qtbot, pw) == "ok", pw.status.value
    masked = table_from_points(viewer.layers[f"{NAME} vesicles"]).accepted()
    assert 0 < len(masked) < len(table.accepted())
    assert np.all(masked["x"] < mask.shape[2] / 2 + 1)


@pytest.mark.slow
def test_predict_widget_with_real_weights(make_napari_viewer, qtbot, crop, weights_path):
    from cryoves.napari._widgets import PredictWidget

    viewer = make_napari_viewer()
    small = dict(crop)
    z = slice(0, 40)
    small["tomogram"] = np.ascontiguousarray(crop["tomogram"][z, :96, :96])
    name = add_crop_layers(viewer, small, with_probability=False)
    pw = dock(viewer, PredictWidget)
    pw.weights.value = weights_path
    assert "trained at" in pw.weights_label.value
    assert pw.voxel_size.value == pytest.approx(crop["voxel_size"])
    assert "rescaled" in pw.rescale_label.value
    pw._run_clicked()
    assert wait_done(qtbot, pw, timeout=300_000) == "ok", pw.status.value
    prob = viewer.layers[f"{name} probability"]
    assert prob.data.shape == small["tomogram"].shape
    assert 0.0 <= float(prob.data.min()) and float(prob.data.max()) <= 1.0
    _check_spatial(prob, crop["voxel_size"])
    import sys

    assert "tensorflow" in sys.modules


@pytest.mark.slow
def test_full_pipeline_with_network(make_napari_viewer, qtbot, crop, weights_path):
    pytest.importorskip("cryoves.pipeline")
    from cryoves.napari._widgets import PipelineWidget

    viewer = make_napari_viewer()
    name = add_crop_layers(viewer, crop, with_probability=False)
    pw = dock(viewer, PipelineWidget)
    pw.weights.value = weights_path
    pw._run_clicked()
    assert wait_done(qtbot, pw, timeout=400_000) == "ok", pw.status.value
    for suffix in ("probability", "labels (global)", "labels (adaptive)", "vesicles", "vesicle labels"):
        assert f"{name} {suffix}" in viewer.layers
    table = table_from_points(viewer.layers[f"{name} vesicles"])
    assert len(table.accepted()) >= 1


def test_predict_widget_without_weights_says_so(make_napari_viewer, tmp_path):
    from cryoves.napari._widgets import PredictWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="t", scale=(2.0,) * 3)
    pw = dock(viewer, PredictWidget)
    pw.weights.value = str(tmp_path / "nope.h5")
    assert "not found" in pw.weights_label.value
    pw._run_clicked()
    assert "not found" in pw.status.value
    assert "t probability" not in viewer.layers


def test_stages_through_napari_plugin_menu(sample_viewer, qtbot, recwarn):
    """Widgets created by napari (Plugins menu, viewer injected as a proxy) do the same work."""
    viewer = sample_viewer
    _, tw = viewer.window.add_plugin_dock_widget("cryoves", "2. Threshold")
    tw._run_clicked()
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    tw._adaptive_clicked()
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    _, rw = viewer.window.add_plugin_dock_widget("cryoves", "3. Refine spheres")
    assert rw.labels.value.name == f"{NAME} labels (adaptive)"
    rw._run_clicked()
    assert wait_done(qtbot, rw) == "ok", rw.status.value
    assert len(viewer.layers[f"{NAME} vesicles"].data) > 0
    assert not [w for w in recwarn if "thread" in str(w.message).lower()]


def test_unknown_voxel_size_must_be_entered(make_napari_viewer, tmp_path):
    import mrcfile

    from cryoves.napari._widgets import PipelineWidget, PredictWidget

    path = tmp_path / "novs.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(1).normal(size=(6, 10, 10)).astype(np.float32))
    viewer = make_napari_viewer()
    layer, = viewer.open(str(path), plugin="cryoves")
    for cls in (PredictWidget, PipelineWidget):
        w = dock(viewer, cls)
        assert "unknown" in w.rescale_label.value
        w._run_clicked()
        assert "voxel size" in w.status.value and "unknown" in w.status.value
        w.voxel_size.value = 1.7  # the user types it
        assert "unknown" not in w.rescale_label.value
    assert "novs probability" not in viewer.layers
