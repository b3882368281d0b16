"""Tests of the simulator (cryoves.simulate) and ``cryoves simulate``.

Small volumes so that the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoves import Cancelled, VesicleTable, render_labels
from cryoves.simulate import (Simulation, SimulationParams, ctf_1d, random_params,
                              simulate_tomogram, tilt_angles)

SMALL = (48, 96, 96)
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.fixture(scope="module")
def small():
    return simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=1)


@pytest.fixture(scope="module")
def clean():
    """High SNR, several vesicles, for checks of the image against the ground truth."""
    params = SimulationParams(snr=1000.0, n_vesicles=14, n_gold=0)
    return simulate_tomogram(shape=(64, 128, 128), voxel_size=1.6, seed=3, params=params)


def _shell_stats(sim, inner, outer):
    """Mean tomogram value where inner <= distance to a vesicle centre / its radius < outer."""
    t = sim.table
    vals = []
    for c, r in zip(t.centers, t.radii):
        lo = np.maximum(np.floor(c - r * outer).astype(int), 0)
        hi = np.minimum(np.ceil(c + r * outer).astype(int) + 1, sim.tomogram.shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / r
        box = sim.tomogram[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        vals.append(box[(d >= inner) & (d < outer)])
    return np.concatenate(vals)


def _radial_profile(tomo, c, rmax, step=0.5):
    lo = np.maximum(np.floor(c - rmax).astype(int), 0)
    hi = np.minimum(np.ceil(c + rmax).astype(int) + 1, tomo.shape)
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    box = tomo[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    bins = np.floor(d / step).astype(int)
    sel = d < rmax
    sums = np.bincount(bins[sel], weights=box[sel])
    counts = np.bincount(bins[sel])
    radii = (np.arange(len(sums)) + 0.5) * step
    ok = counts > 0
    return radii[ok], sums[ok] / counts[ok]


# -- API and ground truth ------------------------------------------------------------
def test_outputs_types_and_shapes(small):
    assert isinstance(small, Simulation)
    assert small.tomogram.shape == SMALL and small.tomogram.dtype == np.float32
    assert small.labels.shape == SMALL and small.labels.dtype == np.uint16
    assert small.mask.shape == SMALL and small.mask.dtype == np.uint8
    assert set(np.unique(small.mask)) <= {0, 1}
    assert np.isfinite(small.tomogram).all()
    assert abs(float(small.tomogram.mean())) < 1e-3 and abs(float(small.tomogram.std()) - 1) < 1e-3
    assert small.voxel_size == 2.0 and small.params.voxel_size == 2.0 and small.params.seed == 1
    t = small.table
    assert isinstance(t, VesicleTable) and len(t) >= 3
    assert t.voxel_size == 2.0
    assert set(t["stage"]) == {"truth"} and set(t["status"]) == {"accepted"}
    assert np.array_equal(t.ids, np.arange(1, len(t) + 1))


def test_labels_equal_render_labels(small):
    assert np.array_equal(small.labels, render_labels(small.table, SMALL))
    assert set(np.unique(small.labels)) == set(range(len(small.table) + 1))


def test_sizes_in_nm_and_voxels(small):
    p = small.params
    r_nm = small.table.nm("radius")
    assert np.all(r_nm >= p.radius_min_nm - 1e-9) and np.all(r_nm <= p.radius_max_nm + 1e-9)
    t_nm = small.table.nm("thickness")
    assert np.all(np.abs(t_nm - p.membrane_thickness_nm) < 0.35 * p.membrane_thickness_nm)
    # the same phantom in nm at another voxel size gives radii in voxels = r_nm / v
    other = simulate_tomogram(shape=SMALL, voxel_size=2.5, seed=1)
    assert np.allclose(other.table.radii * 2.5, other.table.nm("radius"))
    assert 15 / 2.5 <= other.table.radii.min() and other.table.radii.max() <= 30 / 2.5


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_vesicles_inside_and_not_overlapping(seed):
    sim = simulate_tomogram(shape=(40, 96, 112), voxel_size=2.2, seed=seed,
                            params=SimulationParams(n_vesicles=20, cluster_jitter=0.0))
    c, r = sim.table.centers, sim.table.radii
    shape = np.array(sim.tomogram.shape)
    assert len(r) >= 5
    assert np.all(c - r[:, None] >= -1e-9), "a vesicle crosses the lower border"
    assert np.all(c + r[:, None] <= shape - 1 + 1e-9), "a vesicle crosses the upper border"
    d = np.linalg.norm(c[:, None] - c[None], axis=2)
    iu = np.triu_indices(len(r), 1)
    gap = d[iu] - (r[:, None] + r[None])[iu]
    assert np.all(gap >= -1e-6), f"overlap of {-gap.min():.3f} voxels"
    # densely packed: a good share of vesicles has a neighbour within 2 nm
    nearest = np.full(len(r), np.inf)
    np.minimum.at(nearest, iu[0], gap)
    np.minimum.at(nearest, iu[1], gap)
    assert np.mean(nearest * sim.voxel_size < 2.0) > 0.25
    # every labelled voxel inside the volume: the label volume holds whole spheres
    vol = np.bincount(sim.labels.ravel(), minlength=len(r) + 1)[1:]
    expected = 4 / 3 * np.pi * r ** 3
    assert np.all(np.abs(vol / expected - 1) < 0.15)


def test_mask_covers_the_cluster(small):
    inside = small.mask[small.labels > 0]
    assert inside.mean() > 0.95
    assert 0 < small.mask.mean() < 0.9


def test_deterministic_from_seed(small):
    again = simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=1)
    assert np.array_equal(again.tomogram, small.tomogram)
    assert np.array_equal(again.labels, small.labels)
    assert np.array_equal(again.mask, small.mask)
    assert again.table == small.table
    other = simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=2)
    assert not np.array_equal(other.tomogram, small.tomogram)
    assert not np.array_equal(other.table.centers, small.table.centers) if len(other.table) == len(small.table) \
        else True
    # params carry the seed: the same call through params
    via_params = simulate_tomogram(shape=SMALL, params=SimulationParams(voxel_size=2.0, seed=1))
    assert np.array_equal(via_params.tomogram, small.tomogram)


# -- the image agrees with the ground truth ------------------------------------------
def test_radial_profile_minimum_at_membrane(clean):
    t = clean.table
    assert len(t) >= 8
    errors = []
    for c, r, th in zip(t.centers, t.radii, t["thickness"]):
        radii, prof = _radial_profile(clean.tomogram, c, r + 4)
        search = (radii > 0.5 * r) & (radii < r + 3)
        d_min = radii[search][np.argmin(prof[search])]
        errors.append(d_min - (r - th / 2))
    errors = np.abs(np.array(errors))
    assert np.mean(errors <= 1.5) >= 0.8, errors


def test_membranes_dark_fringe_bright(clean):
    t = clean.table
    th = float(np.median(t["thickness"] / t.radii))
    membrane = _shell_stats(clean, 1 - th, 1.0).mean()
    fringe = _shell_stats(clean, 1.0, 1.0 + 0.12).mean()
    lumen = _shell_stats(clean, 0.0, 0.6).mean()
    cytosol = clean.tomogram[(clean.mask == 1) & (clean.labels == 0)].mean()
    assert membrane < cytosol - 0.3
    assert membrane < lumen - 0.3
    assert fringe > membrane + 0.5


def test_invert_contrast_flips_the_sign():
    p = SimulationParams(n_vesicles=4, snr=100.0)
    a = simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=4, params=p)
    b = simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=4,
                          params=SimulationParams(n_vesicles=4, snr=100.0, invert_contrast=True))
    assert np.allclose(a.tomogram, -b.tomogram)
    assert np.array_equal(a.labels, b.labels)


def _wedge_ratio(tomo):
    """Mean XZ power within 20 deg of the kz axis over that beyond 40 deg (mid frequencies)."""
    power = np.abs(np.fft.fftn(tomo)) ** 2
    pzx = power.sum(axis=1)
    nz, nx = pzx.shape
    kz = np.fft.fftfreq(nz)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    ang = np.degrees(np.arctan2(np.abs(kx), np.abs(kz)))
    rad = np.sqrt(kz ** 2 + kx ** 2)
    band = (rad > 0.05) & (rad < 0.3)
    return pzx[band & (ang < 20)].mean() / pzx[band & (ang > 40)].mean()


def test_missing_wedge_present(small):
    assert _wedge_ratio(small.tomogram) < 0.05
    # a wider tilt range fills (most of) the wedge: the measure can fail
    wide = simulate_tomogram(shape=SMALL, voxel_size=2.0, seed=1,
                             params=SimulationParams(tilt_range=85.0, tilt_step=2.5))
    assert _wedge_ratio(wide.tomogram) > 5 * _wedge_ratio(small.tomogram)


def test_elongation_along_z(clean):
    """The autocorrelation of a membrane-rich region is longer along Z than along X."""
    vol = clean.tomogram - clean.tomogram.mean()
    f = np.fft.fftn(vol)
    ac = np.real(np.fft.ifftn(np.abs(f) ** 2))
    ac /= ac[0, 0, 0]
    # width where the autocorrelation falls below 0.2, along z and along x
    wz = np.argmax(ac[:, 0, 0] < 0.2)
    wx = np.argmax(ac[0, 0, :] < 0.2)
    assert wz > wx


# -- physics helpers ----------------------------------------------------------------
def test_tilt_angles_and_ctf():
    a = tilt_angles(60, 2)
    assert a[0] == -60 and a[-1] == 60 and len(a) == 61
    assert len(tilt_angles(60, 3)) == 41
    k = np.linspace(0, 0.5, 2000)
    ctf = ctf_1d(k, defocus_um=-8.0)
    assert ctf[0] == pytest.approx(-0.07)            # amplitude contrast, dark at k = 0
    first_zero = k[np.argmax(ctf > 0)]
    # first zero of the phase CTF: k = sqrt(1 / (lambda * dz)) = 0.252 / nm at 8 um, 300 kV
    assert first_zero == pytest.approx(0.252, abs=0.01)


# -- parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(voxel_size=15.0), "voxel_size"),
    (dict(defocus_um=8.0), "defocus_um"),
    (dict(tilt_step=0.0), "tilt_step"),
    (dict(tilt_range=95.0), "tilt_range"),
    (dict(radius_min_nm=25.0, radius_max_nm=20.0, radius_mean_nm=22.0), "radius"),
    (dict(membrane_thickness_nm=20.0), "membrane_thickness_nm"),
    (dict(snr=-1.0), "snr"),
    (dict(n_vesicles=-3), "n_vesicles"),
    (dict(n_gold=2.5), "n_gold"),
    (dict(dose=float("nan")), "dose"),
])
def test_bad_params_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SimulationParams(**kwargs)


def test_bad_call_rejected():
    with pytest.raises(ValueError, match="shape"):
        simulate_tomogram(shape=(8, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        simulate_tomogram(shape=(64, 64))
    with pytest.raises(ValueError, match="voxel_size"):
        simulate_tomogram(shape=SMALL, voxel_size=0.0)
    with pytest.raises(TypeError, match="SimulationParams"):
        simulate_tomogram(shape=SMALL, params={"voxel_size": 2.0})
    with pytest.raises(ValueError, match="unknown"):
        SimulationParams.from_dict({"voxelsize": 2.0})


def test_random_params_valid_and_reproducible():
    drawn = [random_params(np.random.default_rng(i)) for i in range(20)]
    for p in drawn:
        p.validate()
        assert 0.7 <= p.voxel_size <= 2.5
        assert -10.0 <= p.defocus_um <= -3.0
    assert random_params(3) == random_params(3)
    assert len({p.seed for p in drawn}) == len(drawn)
    assert random_params(1, snr_range=(0.05, 0.5)).snr is not None
    fixed = random_params(1, voxel_size=1.7, n_vesicles=5)
    assert fixed.voxel_size == 1.7 and fixed.n_vesicles == 5
    sim = simulate_tomogram(shape=(40, 80, 80), params=random_params(7, voxel_size_range=(2.0, 2.5)))
    assert np.array_equal(sim.labels, render_labels(sim.table, (40, 80, 80)))


def test_too_many_vesicles_warns():
    with pytest.warns(RuntimeWarning, match="fit"):
        sim = simulate_tomogram(shape=(40, 64, 64), voxel_size=2.0, seed=0,
                                params=SimulationParams(n_vesicles=500))
    assert 0 < len(sim.table) < 500 and sim.n_requested == 500


def test_progress_and_cancel():
    calls = []
    simulate_tomogram(shape=(32, 64, 64), voxel_size=2.5, seed=0, progress=lambda *a: calls.append(a))
    stages = [c[0] for c in calls]
    assert stages[0] == "phantom" and stages[-1] == "reconstruct"
    assert {"phantom", "project", "noise", "reconstruct"} <= set(stages)
    assert all(0 <= d <= t for _, d, t in calls)

    def cancel(stage, done, total):
        if stage == "project":
            raise Cancelled()
    with pytest.raises(Cancelled):
        simulate_tomogram(shape=(32, 64, 64), voxel_size=2.5, seed=0, progress=cancel)


# -- command line ---------------------------------------------------------------------
def _run_cli(*argv):
    from cryoves.cli import main
    return main(["simulate", *map(str, argv)])


def test_cli_writes_all_files(tmp_path, capsys):
    out = tmp_path / "sim"
    rc = _run_cli(out, "--shape", 32, 64, 72, "--voxel-size", 2.5, "--seed", 3, "--snr", 2.0,
                  "--defocus", -6, "--tilt-range", 50, "--tilt-step", 5, "--n-vesicles", 6, "--quiet")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tomogram.mrc", "labels.mrc", "mask.mrc", "vesicles.csv", "params.json"])
    with mrcfile.open(out / "tomogram.mrc", permissive=False) as m:
        assert m.data.shape == (32, 64, 72) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(25.0)      # Angstrom
        assert float(m.voxel_size.z) == pytest.approx(25.0)
    with mrcfile.open(out / "labels.mrc") as m:
        labels = np.asarray(m.data)
        assert m.data.dtype == np.uint16 and float(m.voxel_size.y) == pytest.approx(25.0)
    with mrcfile.open(out / "mask.mrc") as m:
        assert set(np.unique(m.data)) <= {0, 1}
    meta = json.loads((out / "params.json").read_text())
    p = SimulationParams.from_dict(meta["params"])
    assert (p.voxel_size, p.seed, p.snr, p.defocus_um, p.tilt_range, p.tilt_step, p.n_vesicles) == (
        2.5, 3, 2.0, -6.0, 50.0, 5.0, 6)
    assert meta["shape"] == [32, 64, 72]
    with open(out / "vesicles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == meta["n_vesicles"] > 0
    for col in ("id", "z", "y", "x", "radius", "z_nm", "y_nm", "x_nm", "radius_nm", "voxel_size_nm"):
        assert col in rows[0]
    table = VesicleTable.from_arrays([[float(r["z"]), float(r["y"]), float(r["x"])] for r in rows],
                                     [float(r["radius"]) for r in rows],
                                     id=[int(r["id"]) for r in rows], voxel_size=2.5)
    assert np.array_equal(labels, render_labels(table, labels.shape))
    assert float(rows[0]["radius_nm"]) == pytest.approx(float(rows[0]["radius"]) * 2.5, rel=1e-5)
    # same as the API
    sim = simulate_tomogram(shape=(32, 64, 72), params=p)
    with mrcfile.open(out / "tomogram.mrc") as m:
        assert np.array_equal(m.data, sim.tomogram)


def test_cli_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = _run_cli(out, "--shape", 32, 48, 48, "--voxel-size", 2.5, "--quiet")
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _run_cli(out, "--shape", 32, 48, 48, "--voxel-size", 2.5, "--quiet", "--overwrite") == 0
    assert (out / "tomogram.mrc").is_file() and (out / "keep.txt").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_user_errors(tmp_path, capsys):
    assert _run_cli(tmp_path / "a", "--voxel-size", 15, "--quiet") == 2
    assert "voxel_size" in capsys.readouterr().err
    assert _run_cli(tmp_path / "b", "--shape", 4, 64, 64, "--quiet") == 2
    assert "shape" in capsys.readouterr().err
    assert _run_cli(tmp_path / "c", "--defocus", 8, "--quiet") == 2
    assert "defocus" in capsys.readouterr().err


# -- bundled sample data ----------------------------------------------------------------
def test_sample_data_is_small_and_consistent():
    files = ["tomogram.mrc", "labels_truth.mrc", "mask.mrc", "vesicles_truth.csv", "params.json", "README.md"]
    for name in files:
        assert (SAMPLE / name).is_file(), name
    total = sum(p.stat().st_size for p in SAMPLE.iterdir() if p.is_file())
    assert total <= 6 * 1024 * 1024
    meta = json.loads((SAMPLE / "params.json").read_text())
    v = meta["voxel_size_nm"]
    with mrcfile.open(SAMPLE / "tomogram.mrc") as m:
        assert m.header.mode == 0 and m.data.dtype == np.int8
        assert float(m.voxel_size.x) == pytest.approx(v * 10)
        assert m.data.min() == -128 and m.data.max() == 127
        shape = m.data.shape
    with mrcfile.open(SAMPLE / "labels_truth.mrc") as m:
        labels = np.asarray(m.data).astype(np.uint16)
    with open(SAMPLE / "vesicles_truth.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert 40 <= len(rows) <= 80
    table = VesicleTable.from_arrays([[float(r["z"]), float(r["y"]), float(r["x"])] for r in rows],
                                     [float(r["radius"]) for r in rows],
                                     id=[int(r["id"]) for r in rows], voxel_size=v)
    assert np.array_equal(labels, render_labels(table, shape))


def test_csv_reads_back_with_cryoves_io(tmp_path):
    """vesicles.csv has the format of cryoves.io (read back exactly when that module exists)."""
    io = pytest.importorskip("cryoves.io")
    from cryoves.cli.simulate import CSV_COLUMNS, vesicles_csv_text
    sim = simulate_tomogram(shape=(32, 64, 64), voxel_size=2.5, seed=2)
    path = tmp_path / "v.csv"
    path.write_text(vesicles_csv_text(sim.table))
    assert path.read_text().splitlines()[0].split(",") == list(CSV_COLUMNS)
    assert io.read_vesicles_csv(path) == sim.table
    sample = io.read_vesicles_csv(SAMPLE / "vesicles_truth.csv")
    assert set(sample["stage"]) == {"truth"} and len(sample) >= 40


def test_sample_data_reproducible(tmp_path):
    """The README's recipe regenerates the committed files exactly."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sample_data", SAMPLE / "make_sample_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    for name in ("labels_truth.mrc", "mask.mrc"):
        with mrcfile.open(SAMPLE / name) as a, mrcfile.open(tmp_path / name) as b:
            assert np.array_equal(a.data, b.data), name
    with mrcfile.open(SAMPLE / "tomogram.mrc") as a, mrcfile.open(tmp_path / "tomogram.mrc") as b:
        # bit-identical on the machine that made it; allow float rounding of another CPU
        diff = np.abs(a.data.astype(np.int16) - b.data.astype(np.int16))
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    assert (SAMPLE / "vesicles_truth.csv").read_text() == (tmp_path / "vesicles_truth.csv").read_text()
