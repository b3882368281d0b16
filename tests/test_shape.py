"""Membrane shape checks: a closed membrane and a vesicle's lumen (cryoves.refine.membrane_shape)
and their use by the outlier stage (cryoves.outliers.filter_outliers)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from _synthetic import draw_vesicles, random_vesicles, shell_profile
from cryoves.outliers import filter_outliers
from cryoves.refine import MembraneShape, intensity_normalization, membrane_shape
from cryoves.table import VesicleTable

SHAPE = (64, 96, 160)
TUBE = (40.0, 70.0)      # (z, y) of a tube running along X
TUBE_R = 8.0
CORE = np.array([20.0, 20.0, 130.0])  # a dense-core vesicle
CORE_R = 9.0


@pytest.fixture(scope="module")
def scene():
    """Ten vesicles, one tube along X (a sphere of its radius fits its cross-section), one dense-core vesicle."""
    centers, radii = random_vesicles((SHAPE[0], 60, 100), 10, r_range=(7.0, 10.0), seed=3)
    tomo = draw_vesicles(SHAPE, centers, radii, noise=0.25, seed=5).astype(np.float64)
    zz, yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    d_axis = np.sqrt((zz - TUBE[0]) ** 2 + (yy - TUBE[1]) ** 2) + 0 * xx
    tube = shell_profile(d_axis, TUBE_R)
    tube[..., :20] = 0  # the tube ends inside the volume
    tomo += tube
    d = np.sqrt((zz - CORE[0]) ** 2 + (yy - CORE[1]) ** 2 + (xx - CORE[2]) ** 2)
    tomo += shell_profile(d, CORE_R) - 0.9 * ndi.gaussian_filter((d < 0.65 * CORE_R).astype(float), 0.7)
    return tomo.astype(np.float32), centers, radii


def test_membrane_shape_vesicle_tube_dense_core(scene):
    tomo, centers, radii = scene
    norm = intensity_normalization(tomo)
    ves = [membrane_shape(tomo, c, r, 2.0, normalization=norm) for c, r in zip(centers, radii)]
    assert all(isinstance(v, MembraneShape) for v in ves)
    assert min(v.coverage for v in ves) >= 0.85
    assert all(-0.3 <= v.lumen <= 0.7 for v in ves)
    tube = membrane_shape(tomo, (TUBE[0], TUBE[1], 90.0), TUBE_R, 2.0, normalization=norm)
    assert tube.coverage < 0.7          # the membrane is missing along the tube's axis
    core = membrane_shape(tomo, CORE, CORE_R, 2.0, normalization=norm)
    assert core.coverage >= 0.85        # closed ...
    assert core.lumen > 0.9             # ... but dense inside
    # outside the volume: not measurable, says so with NaN
    out = membrane_shape(tomo, (-50.0, -50.0, -50.0), 8.0, 2.0, normalization=norm)
    assert np.isnan(out.coverage)


def test_filter_outliers_removes_tube_and_dense_core(scene):
    tomo, centers, radii = scene
    extra_c = np.array([[TUBE[0], TUBE[1], 90.0], CORE])
    table = VesicleTable.from_arrays(np.vstack([centers, extra_c]), np.r_[radii, TUBE_R, CORE_R], voxel_size=2.0,
                                     thickness=np.full(len(radii) + 2, 2.0), density=np.full(len(radii) + 2, -1.0))
    kw = dict(min_radius_nm=1.0, max_iter=2, remove_overlaps=False, keep_score=None, p_threshold=0.0)
    out = filter_outliers(tomo, table, 2.0, **kw)
    n = len(radii)
    assert list(out["status"][:n]) == ["accepted"] * n
    assert out["status"][n] == "removed" and out["note"][n].startswith("membrane not closed")
    assert out["status"][n + 1] == "removed" and out["note"][n + 1].startswith("dense lumen")
    # the checks can be turned off
    off = filter_outliers(tomo, table, 2.0, min_coverage=None, lumen_deviation=None, **kw)
    assert off["status"][n] == "accepted" and off["status"][n + 1] == "accepted"


def test_filter_outliers_removes_a_faint_sphere_around_a_light_lumen():
    """The end of a tube or compartment seen from inside: a closed but faint membrane (score 0.46 of
    the vesicles' median) whose lumen is lighter than its dark surroundings (lumen -0.65 against
    the vesicles' 0.29). Removed by default, accepted with the check off; the vesicles stay."""
    centers, radii = random_vesicles((SHAPE[0], 60, 100), 10, r_range=(7.0, 10.0), seed=3)
    tomo = draw_vesicles(SHAPE, centers, radii, noise=0.25, seed=5).astype(np.float64)
    c, r = np.array([32.0, 70.0, 125.0]), 8.0
    zz, yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    tomo += 0.6 * shell_profile(d, r) - 0.5 * ndi.gaussian_filter(((d < 20) & (d > r)).astype(float), 1.0)
    tomo = tomo.astype(np.float32)
    table = VesicleTable.from_arrays(np.vstack([centers, c]), np.r_[radii, r], voxel_size=2.0,
                                     thickness=np.full(len(radii) + 1, 2.0), density=np.full(len(radii) + 1, -1.0))
    kw = dict(min_radius_nm=1.0, max_iter=2, remove_overlaps=False, keep_score=None, p_threshold=0.0)
    out = filter_outliers(tomo, table, 2.0, **kw)
    n = len(radii)
    assert list(out["status"][:n]) == ["accepted"] * n
    assert out["status"][n] == "removed" and out["note"][n].startswith("faint membrane"), out["note"][n]
    off = filter_outliers(tomo, table, 2.0, faint_score_relative=None, **kw)
    assert list(off["status"]) == ["accepted"] * (n + 1)


def test_filter_outliers_removes_spheres_above_max_radius():
    """An outer radius above max_radius_nm (34 nm) is no synaptic vesicle: re-fitted, then removed."""
    centers, radii = random_vesicles((48, 96, 96), 8, r_range=(7.0, 10.0), seed=11)
    big_c, big_r = np.array([40.0, 150.0, 150.0]), 19.0  # 38 nm at 2 nm voxels
    tomo = draw_vesicles((80, 200, 200), np.vstack([centers, big_c]), np.r_[radii, big_r], noise=0.25, seed=2)
    table = VesicleTable.from_arrays(np.vstack([centers, big_c]), np.r_[radii, big_r], voxel_size=2.0,
                                     thickness=np.full(len(radii) + 1, 2.0), density=np.full(len(radii) + 1, -1.0))
    kw = dict(max_iter=1, remove_overlaps=False, keep_score=None, p_threshold=0.0)
    out = filter_outliers(tomo, table, 2.0, **kw)
    n = len(radii)
    assert list(out["status"][:n]) == ["accepted"] * n
    assert out["status"][n] == "removed" and out["note"][n].endswith("nm > 34 nm"), out["note"][n]
    off = filter_outliers(tomo, table, 2.0, max_radius_nm=None, **kw)
    assert off["status"][n] == "accepted"


def test_spheres_squeezed_by_an_overlap(scene):
    """Resolving an overlap may shrink a sphere to no vesicle: at or below 12 nm, or to no membrane."""
    from cryoves.outliers import SHRUNK_NOTE, _check_shrunk

    tomo, centers, radii = scene
    norm = intensity_normalization(tomo)
    # a true vesicle, a sphere over empty background, and one shrunk below 12 nm
    c = np.vstack([centers[0], [12.0, 85.0, 60.0], centers[1]])
    table = VesicleTable.from_arrays(c, np.r_[radii[0] - 0.5, 8.0, 5.9], voxel_size=2.0,
                                     thickness=np.full(3, 2.0), note=np.array([SHRUNK_NOTE] * 3, object))
    before = table.radii + 1.0
    _check_shrunk(tomo, table, before, 2.0, norm, 12.0, min_score=5.0, min_coverage=0.7)
    assert list(table["status"]) == ["accepted", "removed", "removed"]
    assert table["note"][1].startswith("no membrane left after resolving an overlap")
    assert table["note"][2].startswith("radius 11.8 nm <= 12 nm after resolving an overlap")
