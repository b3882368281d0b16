"""Every dock widget on the bundled sample, stage by stage and as the full pipeline.

The post-processing widgets get a probability map derived from the ground truth (the network
is not what they test); Predict and the full pipeline run the real network (default weights,
else the CryoVesNet reference weights) on a small crop.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import add_crop_layers, click, close_dock, dock, wait_done

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
    from cryoves.napari._export import ExportWidget
    from cryoves.napari._outliers import OutlierWidget
    from cryoves.napari._refine import RefineWidget
    from cryoves.napari._threshold import ThresholdWidget

    viewer = sample_viewer
    _, _, truth, vs = sample

    # 2. threshold: automatic global value, then adaptive
    tw = dock(viewer, ThresholdWidget)
    assert tw.tomogram.value is viewer.layers[NAME]
    assert tw.probability.value is viewer.layers[f"{NAME} probability"]
    click(qtbot, tw.run_button)
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    glob = viewer.layers[f"{NAME} labels (global)"]
    _check_spatial(glob, vs)
    assert 0.8 <= tw.threshold.value <= 1.0
    assert glob.metadata["cryoves_threshold"] == pytest.approx(tw.threshold.value)
    click(qtbot, tw.adaptive_button)
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    adaptive = viewer.layers[f"{NAME} labels (adaptive)"]
    _check_spatial(adaptive, vs)
    n_seg = len(np.unique(adaptive.data)) - 1
    assert abs(n_seg - len(truth)) <= 0.15 * len(truth)

    # 3. refine: picks the adaptive labels, writes points + labels
    rw = dock(viewer, RefineWidget)
    assert rw.labels.value is adaptive
    click(qtbot, rw.run_button)
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
    assert m.f1 >= 0.85, m
    assert abs(len(acc) - len(truth)) <= 0.15 * len(truth)

    # 4. outliers: live preview, then apply
    ow = dock(viewer, OutlierWidget)
    assert ow.vesicles.value is pts
    pvalue_before = pts.features["pvalue"].to_numpy().copy()
    ow.p_threshold.value = 0.5
    flagged_05 = int(ow.flagged.sum())
    ow.p_threshold.value = 0.05
    flagged_005 = int(ow.flagged.sum())
    assert flagged_05 >= flagged_005 and flagged_05 > 0
    red = np.all(np.isclose(pts.border_color, [1.0, 48 / 255, 48 / 255, 1.0]), axis=1)
    np.testing.assert_array_equal(red, ow.flagged)  # the preview colours exactly the flagged rows
    # previewing changes the display only, never the exported columns
    np.testing.assert_array_equal(pts.features["pvalue"].to_numpy(), pvalue_before)
    assert "outlier_preview" not in pts.features
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
    click(qtbot, ow.run_button)
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
    click(qtbot, ew.run_button)
    assert wait_done(qtbot, ew) == "ok", ew.status.value
    from cryoves.io import read_labels, read_vesicles_csv

    written = sorted(p.name for p in tmp_path.iterdir())
    # the command line's file names, one set with its run record written last
    ends = ["_labels.mrc", "_pyto.mrc", "_segment.json", "_vesicles.csv", "_vesicles.mod", "_vesicles.star"]
    assert len(written) == 6 and all(any(w.endswith(e) for w in written) for e in ends), written
    csv = read_vesicles_csv(next(tmp_path.glob("*_vesicles.csv")))
    assert len(csv.accepted()) == len(after.accepted())
    lab, lvs = read_labels(next(tmp_path.glob("*_labels.mrc")))
    assert lvs == pytest.approx(vs) and lab.shape == viewer.layers[NAME].data.shape
    # exporting again without 'Overwrite' is refused with a clear message, nothing raised
    click(qtbot, ew.run_button)
    assert wait_done(qtbot, ew) == "error"
    assert "Overwrite" in ew.runner.last_error


def test_threshold_slider_relabels_live(sample_viewer, qtbot):
    from cryoves.napari._threshold import ThresholdWidget

    tw = dock(sample_viewer, ThresholdWidget)
    click(qtbot, tw.run_button)
    wait_done(qtbot, tw)
    glob = sample_viewer.layers[f"{NAME} labels (global)"]
    before = int((glob.data > 0).sum())
    tw.threshold.value = 0.55
    qtbot.waitUntil(lambda: glob.metadata.get("cryoves_threshold") == pytest.approx(0.55), timeout=30_000)
    wait_done(qtbot, tw)
    assert int((glob.data > 0).sum()) > before  # lower threshold, larger segments
    assert sample_viewer.layers[f"{NAME} labels (global)"] is glob


def test_cancel_and_errors_are_clean(sample_viewer, qtbot):
    from cryoves.napari._refine import RefineWidget
    from cryoves.napari._threshold import ThresholdWidget

    viewer = sample_viewer
    tw = dock(viewer, ThresholdWidget)
    click(qtbot, tw.run_button)
    wait_done(qtbot, tw)
    click(qtbot, tw.adaptive_button)
    wait_done(qtbot, tw)
    rw = dock(viewer, RefineWidget)
    click(qtbot, rw.run_button)
    assert rw.runner.busy and rw.cancel_button.enabled
    click(qtbot, rw.cancel_button)  # the user presses Cancel
    assert wait_done(qtbot, rw) == "cancelled"
    assert f"{NAME} vesicles" not in viewer.layers
    assert rw.run_button.enabled and not rw.cancel_button.enabled
    # napari's own progress bar (activity panel) has a cancel button too
    from napari.utils import progress

    click(qtbot, rw.run_button)
    bars = [b for b in progress._all_instances if b is rw.runner._pbar]
    assert len(bars) == 1 and bars[0].desc == "Sphere fitting"
    bars[0].cancel()
    assert wait_done(qtbot, rw) == "cancelled"
    assert rw.runner._pbar is None and bars[0] not in progress._all_instances
    # a stage run without its input says what to do, no exception escapes
    viewer.layers.remove(f"{NAME} labels (adaptive)")
    viewer.layers.remove(f"{NAME} labels (global)")
    viewer.layers.remove(f"{NAME} truth labels")
    click(qtbot, rw.run_button)
    assert "run the Threshold widget first" in rw.status.value
    # an error inside the worker becomes a one-line message
    bad = viewer.add_image(np.zeros((5, 5, 5), np.float32), name="bad", metadata={"voxel_size_nm": 2.0})
    tw.tomogram.value = bad
    click(qtbot, tw.run_button)
    assert "differ in shape" in tw.status.value


def test_full_pipeline_reusing_probability(sample_viewer, qtbot, sample):
    """One button, same parameters, same layers as stage by stage (probability given: no network)."""
    from cryoves.napari._pipeline import PipelineWidget

    viewer = sample_viewer
    _, _, truth, vs = sample
    pw = dock(viewer, PipelineWidget)
    pw.probability.value = viewer.layers[f"{NAME} probability"]
    click(qtbot, pw.run_button)
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
    click(qtbot, pw.run_button)
    assert wait_done(qtbot, pw) == "ok", pw.status.value
    masked = table_from_points(viewer.layers[f"{NAME} vesicles"]).accepted()
    assert 0 < len(masked) < len(table.accepted())
    assert np.all(masked["x"] < mask.shape[2] / 2 + 1)


def test_pipeline_min_radius_moves_the_segment_size_rule(make_napari_viewer):
    from cryoves.napari._pipeline import PipelineWidget
    from cryoves.pipeline import SegmentParams

    viewer = make_napari_viewer()
    pw = dock(viewer, PipelineWidget)
    base = SegmentParams()
    assert pw.params() == base
    pw.fields["min_radius_nm"].value = 9.0  # smaller vesicles: their segments are not dropped before the fit
    assert pw.params() == base.for_min_radius(9.0)
    assert pw.params().segment_min_radius_nm == base.segment_min_radius_nm - 3.0


@pytest.mark.slow
def test_predict_widget_with_real_weights(make_napari_viewer, qtbot, crop, weights_path):
    from cryoves.napari._predict import PredictWidget

    viewer = make_napari_viewer()
    small = dict(crop)
    z = slice(0, 40)
    small["tomogram"] = np.ascontiguousarray(crop["tomogram"][z, :96, :96])
    name = add_crop_layers(viewer, small, with_probability=False)
    pw = dock(viewer, PredictWidget)
    pw.panel.weights.value = weights_path
    assert "nm voxels" in pw.panel.weights_label.value
    assert pw.panel.voxel_size.value == pytest.approx(crop["voxel_size"])
    assert "rescaled" in pw.panel.rescale_label.value
    click(qtbot, pw.run_button)
    assert wait_done(qtbot, pw, timeout=300_000) == "ok", pw.status.value
    prob = viewer.layers[f"{name} probability"]
    assert prob.data.shape == small["tomogram"].shape
    assert 0.0 <= float(prob.data.min()) and float(prob.data.max()) <= 1.0
    _check_spatial(prob, crop["voxel_size"])
    import sys

    assert "tensorflow" in sys.modules


@pytest.mark.slow
def test_full_pipeline_with_network(make_napari_viewer, qtbot, crop, weights_path):
    from cryoves.napari._pipeline import PipelineWidget

    viewer = make_napari_viewer()
    name = add_crop_layers(viewer, crop, with_probability=False)
    pw = dock(viewer, PipelineWidget)
    pw.panel.weights.value = weights_path
    click(qtbot, pw.run_button)
    assert wait_done(qtbot, pw, timeout=400_000) == "ok", pw.status.value
    for suffix in ("probability", "labels (global)", "labels (adaptive)", "vesicles", "vesicle labels"):
        assert f"{name} {suffix}" in viewer.layers
    table = table_from_points(viewer.layers[f"{name} vesicles"])
    assert len(table.accepted()) >= 1


def test_predict_widget_without_weights_says_so(make_napari_viewer, qtbot, tmp_path):
    from cryoves.napari._predict import PredictWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="t", scale=(2.0,) * 3)
    pw = dock(viewer, PredictWidget)
    pw.panel.weights.value = str(tmp_path / "nope.h5")
    assert "not found" in pw.panel.weights_label.value
    click(qtbot, pw.run_button)
    assert "not found" in pw.status.value
    assert "t probability" not in viewer.layers


def test_stages_through_napari_plugin_menu(sample_viewer, qtbot, recwarn):
    """Widgets created by napari (Plugins menu, viewer injected as a proxy) do the same work."""
    viewer = sample_viewer
    _, tw = viewer.window.add_plugin_dock_widget("cryoves", "2. Threshold")
    click(qtbot, tw.run_button)
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    click(qtbot, tw.adaptive_button)
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    _, rw = viewer.window.add_plugin_dock_widget("cryoves", "3. Refine spheres")
    assert rw.labels.value.name == f"{NAME} labels (adaptive)"
    click(qtbot, rw.run_button)
    assert wait_done(qtbot, rw) == "ok", rw.status.value
    assert len(viewer.layers[f"{NAME} vesicles"].data) > 0
    assert not [w for w in recwarn if "thread" in str(w.message).lower()]


def test_unknown_voxel_size_must_be_entered(make_napari_viewer, qtbot, tmp_path):
    import mrcfile

    from cryoves.napari._pipeline import PipelineWidget
    from cryoves.napari._predict import PredictWidget

    path = tmp_path / "novs.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(1).normal(size=(6, 10, 10)).astype(np.float32))
    viewer = make_napari_viewer()
    layer, = viewer.open(str(path), plugin="cryoves")
    for cls in (PredictWidget, PipelineWidget):
        w = dock(viewer, cls)
        assert "unknown" in w.panel.rescale_label.value
        click(qtbot, w.run_button)
        assert "voxel size" in w.status.value and "unknown" in w.status.value
        w.panel.voxel_size.value = 22.0  # Å typed for nm: refused by the core's validator, with the hint
        click(qtbot, w.run_button)
        assert "Did you give Å" in w.status.value, w.status.value
        w.panel.voxel_size.value = 1.7  # the user types it
        assert "unknown" not in w.panel.rescale_label.value
    assert "novs probability" not in viewer.layers


@pytest.fixture
def segmented_viewer(sample_viewer, sample):
    """The sample viewer with every stage's layers (the core pipeline on the GT-derived probability)."""
    from cryoves.napari._results import show_segmentation
    from cryoves.pipeline import segment

    viewer = sample_viewer
    tomo, _, _, vs = sample
    prob = viewer.layers[f"{NAME} probability"].data
    result = segment(np.asarray(tomo), vs, None, probability=prob)
    show_segmentation(viewer, result, NAME, tomo.shape, vs)
    return viewer


def test_tomogram_is_refused_as_probability_map(sample_viewer, qtbot):
    from cryoves.napari._pipeline import PipelineWidget
    from cryoves.napari._threshold import ThresholdWidget

    viewer = sample_viewer
    tw = dock(viewer, ThresholdWidget)
    assert viewer.layers[NAME] in tw.probability.choices  # listed, but refused when run
    tw.probability.value = viewer.layers[NAME]
    click(qtbot, tw.run_button)
    assert not tw.runner.busy  # nothing started
    assert "not a probability map" in tw.status.value and "0..1" in tw.status.value
    assert f"{NAME} labels (global)" not in viewer.layers
    # a map of values in 0..1 without the probability role (e.g. opened from a file) is accepted
    plain = viewer.add_image(np.asarray(viewer.layers[f"{NAME} probability"].data), name="from file",
                             scale=viewer.layers[NAME].scale)
    tw.probability.value = plain
    click(qtbot, tw.run_button)
    assert wait_done(qtbot, tw) == "ok", tw.status.value
    pw = dock(viewer, PipelineWidget)
    pw.probability.value = viewer.layers[NAME]
    click(qtbot, pw.run_button)
    assert not pw.runner.busy and "not a probability map" in pw.status.value


def test_closing_a_dock_cancels_its_worker(segmented_viewer, qtbot):
    from cryoves.napari._refine import RefineWidget

    viewer = segmented_viewer
    viewer.layers.remove(f"{NAME} vesicles")
    viewer.layers.remove(f"{NAME} vesicle labels")
    rw = dock(viewer, RefineWidget)
    click(qtbot, rw.run_button)
    assert rw.runner.busy
    worker = rw.runner.worker
    close_dock(qtbot, rw)
    assert rw.closed
    qtbot.waitUntil(lambda: not rw.runner.busy, timeout=120_000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    qtbot.wait(200)
    assert rw.runner.last_outcome == "discarded"
    assert f"{NAME} vesicles" not in viewer.layers and f"{NAME} vesicle labels" not in viewer.layers
    click(qtbot, rw.run_button)  # a closed widget starts nothing
    assert not rw.runner.busy


def test_outlier_preview_is_display_only_and_removed_on_close(segmented_viewer, qtbot):
    from cryoves.napari._outliers import OutlierWidget

    viewer = segmented_viewer
    pts = viewer.layers[f"{NAME} vesicles"]
    colors = np.array(pts.border_color, copy=True)
    features = pts.features.copy()
    ow = dock(viewer, OutlierWidget)  # merely opening it: nothing exported changes
    assert ow.vesicles.value is pts
    ow.p_threshold.value = 0.9  # flags many
    assert ow.flagged.sum() > 0
    assert not np.allclose(pts.border_color, colors)
    assert pts.features.equals(features)
    # the layer is rewritten with fewer rows while the preview is on (e.g. a stage rerun)
    from cryoves.napari._results import show_vesicles

    table = table_from_points(pts)
    show_vesicles(viewer, table.select(np.arange(1, len(table))), NAME, viewer.layers[NAME].data.shape)
    assert len(pts.data) == len(colors) - 1
    colors, features = np.array(pts.border_color, copy=True), pts.features.copy()
    viewer.add_points(np.zeros((1, 3)), name="another layer")  # napari refreshes the widget
    ow.p_threshold.value = 0.8
    assert len(ow.flagged) == len(pts.data) and ow.flagged.sum() > 0
    close_dock(qtbot, ow)
    np.testing.assert_allclose(pts.border_color, colors)  # the red preview is gone
    assert pts.features.equals(features)
    viewer.layers.selection.active = pts  # layer events after closing do not bring the preview back
    viewer.add_points(np.zeros((1, 3)), name="other")
    np.testing.assert_allclose(pts.border_color, colors)
    assert pts.features.equals(features)


def test_rerun_never_replaces_an_edited_vesicle_layer(segmented_viewer, qtbot):
    from cryoves.napari._outliers import OutlierWidget
    from cryoves.napari._refine import RefineWidget

    viewer = segmented_viewer
    pts = viewer.layers[f"{NAME} vesicles"]
    labels = viewer.layers[f"{NAME} vesicle labels"]
    pts.selected_data = {0}
    pts.remove_selected()  # the user's edit
    pts.metadata["cryoves_edited"] = True  # as the editor marks it
    edited = np.array(pts.data, copy=True)
    edited_labels = np.array(labels.data, copy=True)
    rw = dock(viewer, RefineWidget)
    click(qtbot, rw.run_button)
    assert wait_done(qtbot, rw) == "ok", rw.status.value
    np.testing.assert_array_equal(pts.data, edited)  # kept
    np.testing.assert_array_equal(labels.data, edited_labels)
    rerun = viewer.layers[f"{NAME} vesicles (rerun)"]
    assert len(rerun.data) == len(edited) + 1
    assert f"{NAME} vesicle labels (rerun)" in viewer.layers
    # the outlier filter on the edited layer also writes beside it
    rerun.metadata["cryoves_edited"] = True
    ow = dock(viewer, OutlierWidget)
    ow.vesicles.value = pts
    click(qtbot, ow.run_button)
    assert wait_done(qtbot, ow) == "ok", ow.status.value
    np.testing.assert_array_equal(pts.data, edited)
    assert f"{NAME} vesicles (rerun 2)" in viewer.layers
