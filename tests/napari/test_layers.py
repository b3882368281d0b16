"""The one adapter between the vesicles Points layer and the VesicleTable (cryoves.napari._layers)."""

from __future__ import annotations

import numpy as np
import pytest

from cryoves.napari._layers import (OUTLINE_COLORS, TABLE_KEY, points_layer_data, table_features,
                                    table_from_points, update_points)
from cryoves.table import VesicleTable

pytestmark = pytest.mark.napari


def _table():
    return VesicleTable.from_arrays([[5, 10, 12], [6, 14, 8], [7, 3, 3]], [3.0, 2.5, 4.25], voxel_size=1.5,
                                    id=[4, 9, 2], thickness=[1.0, 1.1, 0.9], density=[-0.5, -0.4, -0.3],
                                    pvalue=[0.5, 0.02, np.nan], stage=["refine", "outliers", "refine"],
                                    status=["accepted", "removed", "accepted"], note=["", "outlier p=0.02", ""])


@pytest.fixture
def layer(make_napari_viewer):
    viewer = make_napari_viewer()
    data, kw, _ = points_layer_data(_table(), "tomo", (12, 20, 24))
    return viewer.add_points(data, **kw)


def test_roundtrip_is_exact_and_keeps_no_snapshot(layer):
    t = _table()
    assert table_from_points(layer) == t
    assert TABLE_KEY not in layer.metadata  # no stale copy of the table
    np.testing.assert_allclose(layer.size, 2 * t.radii)
    assert list(layer.shown) == [True, False, True]


def test_radius_follows_size(layer):
    """What is drawn (size) is what is exported: a resized point changes the radius."""
    size = np.array(layer.size, float)
    size[0] = 11.0
    layer.size = size
    back = table_from_points(layer)
    assert back.radii[0] == pytest.approx(5.5)
    assert back.radii[1:].tolist() == pytest.approx([2.5, 4.25])


def test_ids_never_renumbered_when_napari_copies_a_row(layer):
    """napari's add tool copies the last row's features (its id too): only the new row gets a new id."""
    layer.add([[8.0, 15.0, 15.0]])
    assert len(layer.features) == 4 and layer.features["id"].iloc[-1] == 2  # the duplicate napari made
    back = table_from_points(layer)
    assert back.ids.tolist() == [4, 9, 2, 10]
    layer.selected_data = {0}
    layer.remove_selected()
    assert table_from_points(layer).ids.tolist() == [9, 2, 10]


def test_nm_columns_come_from_the_table(layer):
    t = _table()
    f = table_features(t)
    np.testing.assert_array_equal(f["radius_nm"], t.nm("radius"))
    np.testing.assert_array_equal(f["thickness_nm"], t.nm("thickness"))
    assert layer.features["radius_nm"].tolist() == pytest.approx(t.nm("radius").tolist())
    nan_vs = VesicleTable.from_arrays([[1, 2, 3]], [2.0])
    assert np.isnan(table_features(nan_vs)["radius_nm"][0])


def test_unfitted_radius_stays_nan(make_napari_viewer):
    viewer = make_napari_viewer()
    t = VesicleTable.from_arrays([[5, 5, 5], [6, 6, 6]], [np.nan, 3.0], voxel_size=2.0)
    data, kw, _ = points_layer_data(t, "tomo", (12, 12, 12))
    layer = viewer.add_points(data, **kw)
    back = table_from_points(layer)
    assert np.isnan(back.radii[0]) and back.radii[1] == 3.0


def test_update_points_in_place(layer):
    t = _table()
    t["status"] = ["accepted", "accepted", "removed"]
    t["x"] = t["x"] + 2
    before = layer
    update_points(layer, t, edited_ids=[9])
    assert layer is before
    assert table_from_points(layer) == t
    assert list(layer.shown) == [True, True, False]
    from napari.utils.colormaps.standardize_color import transform_color

    np.testing.assert_allclose(layer.border_color[1], transform_color(OUTLINE_COLORS["edited"])[0])
    np.testing.assert_allclose(layer.border_color[2], transform_color(OUTLINE_COLORS["removed"])[0])
    update_points(layer, t, show_removed=True)
    assert list(layer.shown) == [True, True, True]
    update_points(layer, t)  # remembered
    assert list(layer.shown) == [True, True, True]


def test_update_points_only_changed_rows(layer):
    """The fast path rewrites the changed rows only, and ends equal to a full update."""
    t = _table()
    t["x"] = np.where(t.ids == 2, t["x"] + 3.0, t["x"])
    t["radius"] = np.where(t.ids == 2, 5.0, t["radius"])
    t["status"] = np.where(t.ids == 2, "removed", t["status"])
    update_points(layer, t, edited_ids=[2], changed_ids=[2])
    assert table_from_points(layer) == t
    assert list(layer.shown) == [True, False, False]
    assert layer.features["radius_nm"].tolist() == pytest.approx(t.nm("radius").tolist())
    from napari.utils.colormaps.standardize_color import transform_color

    np.testing.assert_allclose(layer.border_color[2], transform_color(OUTLINE_COLORS["removed"])[0])
    update_points(layer, t, edited_ids=[4], changed_ids=[4])  # the highlight goes to the last edit
    np.testing.assert_allclose(layer.border_color[0], transform_color(OUTLINE_COLORS["edited"])[0])
    t["status"] = np.where(t.ids == 2, "accepted", t["status"])
    t["reviewed"] = np.where(t.ids == 2, "accepted", t["reviewed"])
    update_points(layer, t, edited_ids=[2], changed_ids=[2])
    np.testing.assert_allclose(layer.border_color[2], transform_color(OUTLINE_COLORS["edited"])[0])
    np.testing.assert_allclose(layer.border_color[0], transform_color(OUTLINE_COLORS["accepted"])[0])
    update_points(layer, t, changed_ids=[2])
    np.testing.assert_allclose(layer.border_color[2], transform_color(OUTLINE_COLORS["reviewed"])[0])
    # a row added: the fast path does not apply, the full update does
    t2 = VesicleTable.concat([t, VesicleTable.from_arrays([[3, 3, 3]], [2.0], voxel_size=1.5, id=[11])])
    update_points(layer, t2, changed_ids=[11])
    assert table_from_points(layer) == t2


def test_update_points_append_and_drop_rows(layer):
    """An appended row (add) and a dropped last row (its undo) take the cheap path and stay exact."""
    t = _table()
    t2 = VesicleTable.concat([t, VesicleTable.from_arrays([[3, 4, 5], [6, 6, 6]], [2.0, 3.5], voxel_size=1.5,
                                                          id=[11, 12], stage="editor")])
    update_points(layer, t2, edited_ids=[11, 12], changed_ids=[11, 12])
    assert table_from_points(layer) == t2
    assert list(layer.shown) == [True, False, True, True, True]
    update_points(layer, t, changed_ids=[11, 12])
    assert table_from_points(layer) == t
    assert list(layer.shown) == [True, False, True]


def test_appended_row_is_drawn_and_styled_like_the_others(make_napari_viewer):
    """After the cheap append (events blocked while the arrays grow), the new point is sliced and
    drawn on its slice with the others' outline width and its own id as text, and dropping it
    removes it from the view."""
    viewer = make_napari_viewer()
    t = _table()
    data, kw, _ = points_layer_data(t, "tomo", (12, 20, 24))
    layer = viewer.add_points(data, **kw)
    layer.border_width = 0.25
    layer.text = {"string": "{id}"}
    viewer.dims.set_point(0, 6 * 1.5)          # the slice z = 6 (scale 1.5 nm)
    t2 = VesicleTable.concat([t, VesicleTable.from_arrays([[6, 16, 20]], [2.0], voxel_size=1.5, id=[11],
                                                          stage="editor")])
    update_points(layer, t2, edited_ids=[11], changed_ids=[11])
    assert table_from_points(layer) == t2
    assert 3 in set(np.asarray(layer._view_indices).tolist())      # sliced: on the displayed slice
    assert layer.border_width[3] == pytest.approx(0.25)
    assert list(layer.text.values) == ["4", "9", "2", "11"]          # its id drawn, not a copied one
    update_points(layer, t, changed_ids=[11])
    assert table_from_points(layer) == t
    assert 3 not in set(np.asarray(layer._view_indices).tolist())

