"""Prediction in a child process (cryoves.pipeline.predict_in_child) and the memory helpers around it."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from scipy import ndimage as ndi

from cryoves import io as cio
from cryoves import Cancelled
from cryoves import pipeline as pl
from cryoves import predict as pr
from cryoves import threshold as th


def _child_pids() -> list[int]:
    """Prediction child processes of this process (any state but reaped)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"_child_predict" in cmd:
            out.append(int(name))
    return out


@pytest.fixture()
def small_memmap(tmp_path, small_simulation):
    """The small simulated tomogram as a read-only memory map behind a 16-byte header."""
    data = np.asarray(small_simulation.tomogram, dtype=np.float32)
    path = tmp_path / "tomo.raw"
    with open(path, "wb") as fh:
        fh.write(b"x" * 16)
        data.tofile(fh)
    return np.memmap(path, dtype=np.float32, mode="r", offset=16, shape=data.shape), small_simulation.voxel_size


@pytest.mark.parametrize("vs_factor", [1.0, 0.9])  # 0.9: both maps resampled to the model grid and back
def test_child_prediction_equals_in_process(small_memmap, random_weights, tmp_path, vs_factor):
    tomo, vs = small_memmap
    vs = vs * vs_factor
    params = pl.SegmentParams()
    a, la = pl.predict_stage(tomo, vs, str(random_weights), params, process="main")
    work = tmp_path / "work"
    work.mkdir()
    seen, info = [], {}
    b, lb = pl.predict_in_child(tomo, vs, str(random_weights), params, workdir=work, info=info,
                                progress=lambda *x: seen.append(x))
    assert isinstance(b, np.memmap) and not b.flags.writeable and b.shape == tomo.shape
    assert np.array_equal(a, b) and np.array_equal(la, lb)  # bit for bit
    assert la.max() >= 0 and b.min() >= 0 and b.max() <= 1
    assert seen[-1] == ("predict", seen[-1][2], seen[-1][2]) and {s[0] for s in seen} == {"predict"}
    assert info["device"].startswith(("CPU", "GPU")) and info["precision"] in ("float32", "bfloat16")
    assert info["weights"].endswith(".weights.h5")
    assert list(work.iterdir()) == []  # the maps' files are gone (still readable while mapped)
    assert float(np.asarray(b).sum()) == pytest.approx(float(a.sum()))
    # an array in memory (written to the temporary folder for the child) gives the same maps
    c, lc = pl.predict_in_child(np.array(tomo), vs, str(random_weights), params, workdir=work)
    assert np.array_equal(a, c) and np.array_equal(la, lc) and list(work.iterdir()) == []


def test_child_without_large_pass_and_segment_records_it(small_memmap, random_weights):
    tomo, vs = small_memmap
    params = pl.SegmentParams(large_scale=None)
    prob, large = pl.predict_in_child(tomo, vs, str(random_weights), params)
    assert large is None
    ref, _ = pl.predict_stage(tomo, vs, str(random_weights), params)
    assert np.array_equal(prob, ref)
    res = pl.segment(tomo, vs, str(random_weights), params=params, prediction_process="child")
    assert res.prediction["process"] == "child" and "device" in res.prediction
    assert np.array_equal(res.probability, ref)


def test_child_error_is_raised_with_its_type_and_nothing_is_left(small_memmap, tmp_path):
    tomo, vs = small_memmap
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        pl.predict_in_child(tomo, vs, str(tmp_path / "missing.weights.h5"), workdir=work)
    assert "missing.weights.h5" in str(info.value)
    assert any("child process" in n for n in getattr(info.value, "__notes__", []))
    assert list(work.iterdir()) == [] and _child_pids() == []


def test_cancel_kills_the_child_and_removes_its_files(small_memmap, random_weights, tmp_path):
    tomo, vs = small_memmap
    work = tmp_path / "work"
    work.mkdir()
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done, total))
        assert list(work.iterdir())  # the child's folder exists while it runs
        raise Cancelled()

    with pytest.raises(Cancelled):
        pl.predict_in_child(tomo, vs, str(random_weights), workdir=work, progress=progress)
    assert seen and list(work.iterdir()) == [] and _child_pids() == []


def test_a_child_that_dies_is_a_clear_error(small_memmap, random_weights, tmp_path):
    tomo, vs = small_memmap
    work = tmp_path / "work"
    work.mkdir()

    def progress(stage, done, total):  # kill the child (as the kernel's OOM killer would)
        for pid in _child_pids():
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(ChildProcessError, match=r"killed by signal 9.*out of memory"):
        pl.predict_in_child(tomo, vs, str(random_weights), workdir=work, progress=progress)
    assert list(work.iterdir()) == [] and _child_pids() == []


def test_memmap_source_of_a_view(small_memmap):
    tomo, _ = small_memmap
    view = tomo[5:9]
    path, dtype, offset, shape = cio.memmap_source(view)
    again = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
    assert np.array_equal(again, view) and shape == view.shape
    assert cio.memmap_source(np.array(tomo)) is None  # in memory
    assert cio.memmap_source(tomo[:, ::2]) is None  # not contiguous


def test_auto_process_choice(random_model, monkeypatch):
    small = np.zeros((4, 4, 4), np.float32)
    assert not pl._use_child("auto", small, None) and not pl._use_child("main", small, None)
    assert pl._use_child("child", small, None)
    monkeypatch.setattr(pl, "CHILD_PROCESS_VOXELS", 64)
    assert pl._use_child("auto", small, None) and pl._use_child("auto", small, "w.weights.h5")
    assert not pl._use_child("auto", small, random_model)  # a network loaded here: predicted here
    with pytest.raises(ValueError, match="process must be one of"):
        pl._use_child("elsewhere", small, None)
    random_model.path = None
    with pytest.raises(ValueError, match="no weights file"):
        pl._weights_of(random_model)


def test_cli_threshold_is_the_pipeline_one():
    from cryoves.cli import segment as cli_segment

    assert cli_segment.CHILD_PROCESS_VOXELS == pl.CHILD_PROCESS_VOXELS


def test_cli_predicts_a_large_tomogram_in_a_child(tmp_path, tomo, random_weights, monkeypatch, capsys):
    from cryoves.cli import main
    from cryoves.cli import segment as cli_segment

    calls = []
    real = pl.predict_in_child
    monkeypatch.setattr(pl, "predict_in_child", lambda *a, **k: calls.append(k.get("workdir")) or real(*a, **k))
    out_main = tmp_path / "main"
    assert main(["segment", str(tomo), "--out", str(out_main), "--weights", str(random_weights), "--quiet"]) == 0
    assert calls == []
    monkeypatch.setattr(pl, "CHILD_PROCESS_VOXELS", 1)  # every tomogram is "large"
    monkeypatch.setattr(cli_segment, "CHILD_PROCESS_VOXELS", 1)
    out_child = tmp_path / "child"
    rc = main(["segment", str(tomo), "--out", str(out_child), "--weights", str(random_weights), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert calls == [str(out_child)]  # its temporary files went into the output folder
    assert (out_child / "tomo_vesicles.csv").read_bytes() == (out_main / "tomo_vesicles.csv").read_bytes()
    rec_main = json.loads((out_main / "tomo_segment.json").read_text())
    rec_child = json.loads((out_child / "tomo_segment.json").read_text())
    for key in ("weights", "device", "precision", "n_accepted", "threshold"):
        assert rec_child[key] == rec_main[key], key
    assert not [p for p in out_child.iterdir() if p.name.startswith(".") or p.name.startswith("cryoves-")]


def test_gaussian_filter_equals_scipy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(pr, "_SLAB_VOXELS", 500)  # many blocks
    for shape, sigma in [((17, 20, 23), (0.17, 0.17, 0.17)), ((9, 20, 13), (0.0, 0.3, 0.2)), ((5, 6, 7), (0, 0, 0))]:
        a = rng.normal(size=shape).astype(np.float32)
        path = tmp_path / "a.f32"
        a.tofile(path)
        m = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
        ref = ndi.gaussian_filter(a, sigma=sigma, mode="mirror")
        assert np.array_equal(pr._gaussian_filter(m, sigma, "mirror"), ref), (shape, sigma)


def test_to_input_grid_into_a_file_equals_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(pr, "_SLAB_VOXELS", 300)
    rng = np.random.default_rng(1)
    prob = rng.uniform(-0.2, 1.2, size=(7, 9, 11)).astype(np.float32)
    for shape in [(9, 11, 13), (7, 9, 11)]:
        ref = pr.to_input_grid(prob.copy(), shape)
        out = np.memmap(tmp_path / "o.f32", dtype=np.float32, mode="w+", shape=shape)
        got = pr.to_input_grid(prob.copy(), shape, out=out)
        assert got is out and np.array_equal(np.asarray(got), ref)
    assert pr.model_grid_shape((10, 20, 30), 2.2, 2.2) == (10, 20, 30)
    assert pr.model_grid_shape((100, 200, 300), 2.2, 2.2, scale=0.75) == (75, 150, 225)


def test_label_small_falls_back_to_int32():
    a = np.zeros((20, 20, 20), bool)
    a[::2, ::2, ::2] = True
    lab, n = th._label_small(a[:2], ndi.generate_binary_structure(3, 1))
    assert lab.dtype == np.uint16 and n == 100
    f = np.zeros((82, 82, 82), bool)
    f[::2, ::2, ::2] = True  # 68921 > 65535: int32
    lab, n = th._label_small(f, ndi.generate_binary_structure(3, 1))
    ref, n_ref = ndi.label(f, structure=ndi.generate_binary_structure(3, 1), output=np.int32)
    assert lab.dtype == np.int32 and n == n_ref == 68921 and np.array_equal(lab, ref)


def test_threshold_stages_on_memory_mapped_maps(tmp_path, small_simulation, oracle_probability):
    """global_threshold and add_weak_segments give the same labels on a memory-mapped map (pages released)."""
    tomo = np.asarray(small_simulation.tomogram, dtype=np.float32)
    prob = np.asarray(oracle_probability, dtype=np.float32)
    weak = np.clip(prob * 0.7, 0, 1).astype(np.float32)  # a weak map: candidates to verify
    path = tmp_path / "p.f32"
    weak.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=weak.shape)
    vs = small_simulation.voxel_size
    g_ref = th.global_threshold(tomo, weak)
    g_mm = th.global_threshold(tomo, mm)
    assert g_ref.threshold == g_mm.threshold and np.array_equal(g_ref.labels, g_mm.labels)
    w_ref = th.add_weak_segments(tomo, weak, g_ref.labels, vs)
    w_mm = th.add_weak_segments(tomo, mm, g_mm.labels, vs)
    assert np.array_equal(w_ref, w_mm) and w_ref.max() > g_ref.labels.max()
