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
