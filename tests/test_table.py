import numpy as np
import pytest

from cryoves import VesicleTable, render_labels


def _table():
    return VesicleTable.from_arrays([[10, 20, 30], [10, 20, 45.5], [40, 40, 40]], [6, 8, 5], voxel_size=1.5,
                                    stage=["adaptive", "refine", "refine"])


def test_defaults_and_nm():
    t = _table()
    assert len(t) == 3
    assert list(t.ids) == [1, 2, 3]
    assert list(t["status"]) == ["accepted"] * 3
    assert np.isnan(t["pvalue"]).all()
    np.testing.assert_allclose(t.nm("radius"), [9, 12, 7.5])
    d = t.to_dict()
    np.testing.assert_allclose(d["x_nm"], [45, 68.25, 60])
    assert set(d["voxel_size_nm"]) == {1.5}


def test_select_accepted_concat_and_equality():
    t = _table()
    t["status"] = ["accepted", "removed", "accepted"]
    acc = t.accepted()
    assert list(acc.ids) == [1, 3]
    both = VesicleTable.concat([acc, t.select([1])])
    assert list(both.ids) == [1, 3, 2]
    assert both.copy() == both
    other = both.copy()
    other["radius"] = other.radii + 0.1
    assert other != both


def test_validation_errors():
    with pytest.raises(ValueError, match="unknown"):
        VesicleTable({"z": [1], "y": [1], "x": [1], "radius": [1], "colour": ["red"]})
    with pytest.raises(ValueError, match="status"):
        VesicleTable.from_arrays([[1, 2, 3]], [4], status=["maybe"])
    with pytest.raises(ValueError, match="voxel_size"):
        VesicleTable.from_arrays([[1, 2, 3]], [4], voxel_size=0)
    with pytest.raises(ValueError, match="radii"):
        VesicleTable.from_arrays([[1, 2, 3]], [4, 5])
    with pytest.raises(ValueError, match="voxel_size"):
        VesicleTable.from_arrays([[1, 2, 3]], [4]).nm("x")


def test_rescaled_voxel_centre_convention():
    t = VesicleTable.from_arrays([[3.5, 3.5, 3.5]], [2], voxel_size=2.0)
    up = t.rescaled(2.0)
    # voxel centre 3.5 on the coarse grid spans fine voxels 7..8, centre 7.5
    np.testing.assert_allclose(up.centers, [[7.5, 7.5, 7.5]])
    assert up.voxel_size == 1.0 and up.radii[0] == 4
    np.testing.assert_allclose(up.rescaled(0.5).centers, t.centers)


def test_render_labels_spheres_and_touching_split():
    t = _table()
    lab = render_labels(t, (50, 50, 60))
    assert lab.dtype == np.uint16
    for i, (c, r) in enumerate(zip(t.centers, t.radii), start=1):
        vol = (lab == i).sum()
        # digitised sphere volume close to 4/3 pi r^3
        assert abs(vol - 4 / 3 * np.pi * r**3) / (4 / 3 * np.pi * r**3) < 0.1
        assert lab[tuple(np.round(c).astype(int))] == i
    # spheres 1 (r=6 at x=30) and 2 (r=8 at x=45.5) overlap on x in (37.5, 36]: none here;
    # make them overlap and check the split is by relative distance
    t2 = VesicleTable.from_arrays([[20, 20, 20], [20, 20, 30]], [6, 6], voxel_size=1.0)
    lab2 = render_labels(t2, (40, 40, 40))
    row = lab2[20, 20]
    assert row[13] == 0 and row[14] == 1 and row[24] == 1  # sphere 1 spans x = 14..26
    assert row[26] == 2 and row[36] == 2 and row[37] == 0  # the overlap goes to the nearer centre


def test_render_skips_removed_and_bad_rows():
    t = _table()
    t["status"] = ["removed", "accepted", "accepted"]
    lab = render_labels(t, (50, 50, 60))
    assert not (lab == 1).any() and (lab == 2).any()
    assert (render_labels(t, (50, 50, 60), accepted_only=False) == 1).any()
    with pytest.raises(ValueError, match="3-D"):
        render_labels(t, (50, 50))


def test_render_clips_at_border():
    t = VesicleTable.from_arrays([[0, 0, 0]], [5], voxel_size=1.0)
    lab = render_labels(t, (10, 10, 10))
    assert lab[0, 0, 0] == 1 and (lab == 1).sum() > 0


# ---------------------------------------------------------------------------------------------
# row-level operations (stable ids) and the reviewed column
# ---------------------------------------------------------------------------------------------
def test_row_operations_keep_ids_and_order():
    t = _table()
    t.set_status(2, "removed", note="by hand")
    assert t.row_index_of(3) == 2 and t.has_id(2) and not t.has_id(7)
    row = t.row(2)
    assert row["status"] == "removed" and row["note"] == "by hand" and row["stage"] == "refine"
    assert isinstance(row["z"], float) and isinstance(row["id"], int) and row["reviewed"] == ""
    assert t.next_id() == 4
    new = t.add_row(z=1, y=2, x=3, radius=4.5, stage="editor")
    assert new == 4 and list(t.ids) == [1, 2, 3, 4] and t.row(4)["radius"] == 4.5
    assert np.isnan(t.row(4)["thickness"]) and t.row(4)["status"] == "accepted"
    assert t.add_row({"id": 10, "z": 0, "y": 0, "x": 0, "radius": 1}) == 10 and t.next_id() == 11
    t.update_row(3, radius=7.25, reviewed="accepted")
    assert t.radii[2] == 7.25 and t["reviewed"][2] == "accepted"
    assert t.drop_row(4)["stage"] == "editor"
    assert list(t.ids) == [1, 2, 3, 10] and t["status"][1] == "removed"
    assert render_labels(t, (50, 50, 60)).max() == 10


def test_row_operations_validate():
    t = _table()
    before = t.copy()
    with pytest.raises(ValueError, match="already"):
        t.add_row(id=2, z=1, y=1, x=1, radius=1)
    with pytest.raises(ValueError, match="needs column"):
        t.add_row(z=1, y=1, x=1)
    with pytest.raises(ValueError, match="unknown"):
        t.update_row(1, colour="red")
    with pytest.raises(ValueError, match="status"):
        t.set_status(1, "maybe")
    with pytest.raises(ValueError, match="reviewed"):
        t.update_row(1, reviewed="yes")
    with pytest.raises(ValueError, match="stable"):
        t.update_row(1, id=5)
    with pytest.raises(KeyError, match="no vesicle with id 9"):
        t.row(9)
    with pytest.raises(TypeError, match="number"):
        t.update_row(1, radius="big")
    with pytest.raises(TypeError, match="integer"):
        t.row_index_of(1.5)
    assert t == before
    dup = VesicleTable.concat([t, t])
    with pytest.raises(ValueError, match="2 times"):
        dup.row_index_of(1)
    with pytest.raises(ValueError, match="reviewed"):
        VesicleTable.from_arrays([[1, 2, 3]], [4], reviewed=["perhaps"])


def test_reviewed_column_round_trips_through_csv(tmp_path):
    from cryoves.io import read_vesicles_csv, write_vesicles_csv

    t = _table()
    t.update_row(2, reviewed="rejected", status="removed")
    back = read_vesicles_csv(write_vesicles_csv(tmp_path / "v.csv", t))
    assert back == t and list(back["reviewed"]) == ["", "rejected", ""]


def test_render_region_equals_slice_of_full_rendering():
    rng = np.random.default_rng(3)
    t = VesicleTable.from_arrays(rng.uniform(-3, [40, 70, 70], (80, 3)), rng.uniform(2, 9, 80), voxel_size=1.0)
    full = render_labels(t, (40, 70, 70))
    assert len(np.unique(full)) > 40
    for region in [(slice(0, 40), slice(0, 70), slice(0, 70)), (slice(5, 17), slice(20, 61), slice(33, 34)),
                   (slice(30, 60), slice(None), slice(-10, None))]:
        assert np.array_equal(render_labels(t, (40, 70, 70), region=region), full[region])
    with pytest.raises(ValueError, match="step 1"):
        render_labels(t, (40, 70, 70), region=(slice(0, 4, 2), slice(None), slice(None)))
