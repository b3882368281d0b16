"""Manifest, reader, writers and sample data of the napari plugin."""

from __future__ import annotations

import numpy as np
import pytest

from cryoves import VesicleTable
from cryoves.napari._layers import TABLE_KEY, table_from_points

pytestmark = pytest.mark.napari


def test_manifest_is_valid_and_complete():
    from npe2 import PluginManifest

    from cryoves._resources import manifest_path

    m = PluginManifest.from_file(manifest_path())
    assert m.name == "cryoves"
    contrib = m.contributions
    patterns = {p for r in contrib.readers for p in r.filename_patterns}
    assert {"*.mrc", "*.rec", "*.map", "*.mrcs"} <= patterns
    assert {tuple(w.layer_types) for w in contrib.writers} >= {("labels",), ("points",)}
    assert {e for w in contrib.writers for e in w.filename_extensions} >= {".mrc", ".csv", ".star", ".mod"}
    assert {s.key for s in contrib.sample_data} == {"synapse", "synapse_truth"}
    assert len(contrib.widgets) == 7  # 5 stages, the full pipeline, the editor
    # every command points at something importable
    import importlib

    for cmd in contrib.commands:
        mod, attr = cmd.python_name.split(":")
        assert callable(getattr(importlib.import_module(mod), attr)), cmd.python_name


def _write_tomo(path, shape=(12, 20, 24), vs=1.4):
    from cryoves.io import write_mrc

    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    write_mrc(path, data, vs)
    return data, vs


@pytest.mark.parametrize("ext", [".mrc", ".rec", ".map", ".mrcs"])
def test_reader_sets_scale_and_metadata(tmp_path, ext):
    from cryoves.napari._reader import napari_get_reader

    path = tmp_path / f"tomo{ext}"
    data, vs = _write_tomo(path)
    reader = napari_get_reader(str(path))
    assert reader is not None
    (arr, kw, ltype), = reader(str(path))
    assert ltype == "image"
    assert isinstance(arr, np.memmap)  # float32 files open memory-mapped, not copied
    np.testing.assert_allclose(np.asarray(arr), data)
    assert kw["scale"] == pytest.approx((vs,) * 3)
    assert kw["metadata"]["voxel_size_nm"] == pytest.approx(vs)
    lo, hi = kw["contrast_limits"]
    assert lo < hi
    assert napari_get_reader(str(tmp_path / "table.csv")) is None


def test_reader_large_integer_file_opens_lazily(tmp_path, monkeypatch):
    from cryoves.io import write_mrc
    from cryoves.napari import _reader

    monkeypatch.setattr(_reader, "LAZY_BYTES", 1)  # treat the small file as "large"
    data = (np.arange(8 * 16 * 16) % 251).reshape(8, 16, 16).astype(np.int16)
    path = tmp_path / "big.mrc"
    write_mrc(path, data, 2.0)
    (arr, kw, _), = _reader.read_mrc(str(path))
    import dask.array as da

    assert isinstance(arr, da.Array) and arr.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(arr[3]), data[3].astype(np.float32))
    assert kw["metadata"]["voxel_size_nm"] == pytest.approx(2.0)


def test_reader_missing_voxel_size_opens_with_a_warning(tmp_path, make_napari_viewer):
    import mrcfile

    path = tmp_path / "novs.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(1).normal(size=(6, 10, 10)).astype(np.float32))
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="cryoves")
    assert layers[0].metadata["voxel_size_nm"] is None


def test_reader_opens_label_files_as_labels(tmp_path, make_napari_viewer):
    from cryoves.io import write_labels_mrc

    lab = np.zeros((6, 10, 10), np.uint16)
    lab[2:4, 3:6, 3:6] = 7
    path = tmp_path / "vesicle_labels.mrc"
    write_labels_mrc(path, lab, 1.2)
    viewer = make_napari_viewer()
    layer, = viewer.open(str(path), plugin="cryoves")
    assert type(layer).__name__ == "Labels"
    np.testing.assert_array_equal(layer.data, lab)
    assert layer.scale[0] == pytest.approx(1.2)


def _table():
    return VesicleTable.from_arrays([[5, 10, 12], [6, 14, 8]], [3.0, 2.5], voxel_size=1.5,
                                    thickness=[1.0, 1.1], density=[-0.5, -0.4], pvalue=[0.5, 0.02],
                                    stage=["refine", "outliers"], status=["accepted", "removed"])


def test_points_layer_roundtrip(make_napari_viewer):
    from cryoves.napari._layers import points_layer_data

    viewer = make_napari_viewer()
    t = _table()
    data, kw, _ = points_layer_data(t, "tomo", (12, 20, 24))
    layer = viewer.add_points(data, **kw)
    assert layer.name == "tomo vesicles"
    np.testing.assert_allclose(layer.size, 2 * t.radii)
    assert list(layer.shown) == [True, False]
    assert layer.features["radius_nm"].tolist() == pytest.approx(list(t.nm("radius")))
    assert TABLE_KEY not in layer.metadata  # no stale copy: the layer itself is the table
    back = table_from_points(layer)
    assert back == t
    layer.data = layer.data + np.array([1.0, 0, 0])  # a user moves the points
    assert table_from_points(layer)["z"].tolist() == pytest.approx((t["z"] + 1).tolist())


def test_writers_roundtrip(tmp_path, make_napari_viewer):
    from cryoves.io import read_imod_model, read_labels, read_star, read_vesicles_csv
    from cryoves.napari._layers import points_layer_data

    viewer = make_napari_viewer()
    t = _table()
    data, kw, _ = points_layer_data(t, "tomo", (12, 20, 24))
    pts = viewer.add_points(data, **kw)
    lab = np.zeros((12, 20, 24), np.uint16)
    lab[4:7, 8:12, 10:14] = 3
    labels = viewer.add_labels(lab, name="tomo vesicle labels", scale=(1.5,) * 3,
                               metadata={"voxel_size_nm": 1.5})

    from cryoves.napari import _writer

    p, = _writer.write_labels_mrc(str(tmp_path / "labels.mrc"), labels.data, labels.as_layer_data_tuple()[1])
    back, vs = read_labels(p)
    np.testing.assert_array_equal(back, lab)
    assert vs == pytest.approx(1.5)

    attrs = pts.as_layer_data_tuple()[1]
    p, = _writer.write_vesicles_csv(str(tmp_path / "v.csv"), pts.data, attrs)
    assert read_vesicles_csv(p) == t
    p, = _writer.write_vesicles_star(str(tmp_path / "v.star"), pts.data, attrs)
    assert len(read_star(p, voxel_size=1.5)) == 1  # accepted only
    p, = _writer.write_vesicles_imod(str(tmp_path / "v"), pts.data, attrs)
    assert p.endswith(".mod")
    assert len(read_imod_model(p, voxel_size=1.5)) == 1


def test_save_through_napari(tmp_path, make_napari_viewer):
    """napari's own save (File > Save Selected Layers) picks the cryoves writers by extension."""
    from cryoves.io import read_labels, read_vesicles_csv
    from cryoves.napari._layers import points_layer_data

    viewer = make_napari_viewer()
    t = _table()
    data, kw, _ = points_layer_data(t, "tomo", (12, 20, 24))
    pts = viewer.add_points(data, **kw)
    lab = np.zeros((12, 20, 24), np.uint16)
    lab[1:3, 1:3, 1:3] = 2
    labels = viewer.add_labels(lab, name="l", scale=(1.5,) * 3, metadata={"voxel_size_nm": 1.5})
    viewer.layers.selection = {labels}
    written = viewer.layers.save(str(tmp_path / "l.mrc"), selected=True, plugin="cryoves")
    assert read_labels(written[0])[1] == pytest.approx(1.5)
    viewer.layers.selection = {pts}
    written = viewer.layers.save(str(tmp_path / "v.csv"), selected=True, plugin="cryoves")
    assert len(read_vesicles_csv(written[0])) == 2


def test_sample_data_menu(make_napari_viewer, sample):
    tomo, labels, table, vs = sample
    viewer = make_napari_viewer()
    viewer.open_sample("cryoves", "synapse")
    assert [layer.name for layer in viewer.layers] == ["sample tomogram"]
    layer = viewer.layers["sample tomogram"]
    assert layer.data.shape == tomo.shape
    assert layer.scale[0] == pytest.approx(vs)
    viewer.open_sample("cryoves", "synapse_truth")
    names = [layer.name for layer in viewer.layers]
    assert "sample tomogram truth labels" in names and "sample tomogram truth vesicles" in names
    truth = viewer.layers["sample tomogram truth vesicles"]
    assert len(truth.data) == len(table)
    assert not truth.visible


@pytest.mark.parametrize("title", ["Find vesicles (full pipeline)", "1. Predict", "2. Threshold",
                                   "3. Refine spheres", "4. Outlier filter", "5. Export"])
def test_widgets_open_from_plugins_menu(make_napari_viewer, title):
    viewer = make_napari_viewer()
    viewer.open_sample("cryoves", "synapse")
    dw, widget = viewer.window.add_plugin_dock_widget("cryoves", title)
    # napari injects a proxy of the viewer
    assert [layer.name for layer in widget.viewer.layers] == [layer.name for layer in viewer.layers]
    if hasattr(widget, "tomogram"):
        assert widget.tomogram.value.name == "sample tomogram"
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_reader_compressed(tmp_path):
    import gzip
    import shutil

    from cryoves.napari._reader import napari_get_reader

    src = tmp_path / "t.mrc"
    data, vs = _write_tomo(src)
    gz = tmp_path / "t.mrc.gz"
    with open(src, "rb") as fin, gzip.open(gz, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    (arr, kw, _), = napari_get_reader(str(gz))(str(gz))
    assert kw["name"] == "t"
    np.testing.assert_allclose(np.asarray(arr), data)


def test_plugin_modules_do_not_import_tensorflow():
    """Importing the plugin (reader, writers, widgets) must not load TensorFlow or Keras."""
    import json
    import subprocess
    import sys

    code = ("import sys, json; import cryoves.napari._pipeline, cryoves.napari._predict, cryoves.napari._threshold, "
            "cryoves.napari._refine, cryoves.napari._outliers, cryoves.napari._export, cryoves.napari._reader, "
            "cryoves.napari._writer, cryoves.napari._sample_data, cryoves.napari._params; "
            "import cryoves.napari._params as p; p._defaults(); "
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _not_volumes(tmp_path):
    """Files named like MRC that the reader cannot read, each in its own folder."""
    import mrcfile

    cases = {}
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.mrc").write_text("not a tomogram\n" * 100)
    cases["text"] = d / "a.mrc"
    d = tmp_path / "png"
    d.mkdir()
    (d / "a.mrc").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3000))
    cases["png"] = d / "a.mrc"
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.mrc").write_bytes(b"")
    cases["empty"] = d / "a.mrc"
    d = tmp_path / "2d"
    d.mkdir()
    with mrcfile.new(d / "a.mrc") as m:
        m.set_data(np.zeros((10, 12), np.float32))
    cases["2d"] = d / "a.mrc"
    d = tmp_path / "folder"
    d.mkdir()
    (d / "a.mrc").mkdir()
    cases["folder"] = d / "a.mrc"
    d = tmp_path / "truncated"
    d.mkdir()
    _write_tomo(d / "full.mrc")
    (d / "a.mrc").write_bytes((d / "full.mrc").read_bytes()[:3000])
    cases["truncated"] = d / "a.mrc"
    return cases


@pytest.mark.parametrize("case", ["text", "png", "empty", "2d", "folder", "truncated"])
def test_reader_returns_none_for_what_it_cannot_read(tmp_path, case):
    """napari's convention: None (let another reader try), never an exception."""
    import hashlib

    from cryoves.napari._reader import napari_get_reader

    path = _not_volumes(tmp_path)[case]
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    assert napari_get_reader(str(path)) is None
    good = tmp_path / "good.mrc"
    _write_tomo(good)
    assert napari_get_reader([str(good), str(path)]) is None  # a list is read only when all are readable
    assert napari_get_reader([str(good)]) is not None
    if before is not None:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_writers_use_the_export_names_and_rules(tmp_path):
    """The napari writers write through cryoves.export.write_format (same files as the CLI)."""
    from cryoves.io import read_imod_model
    from cryoves.napari import _writer
    from cryoves.napari._layers import points_layer_data

    t = _table()
    data, kw, _ = points_layer_data(t, "tomo", (12, 20, 24))
    attrs = {"metadata": kw["metadata"], "features": kw.get("features"), "size": kw.get("size"),
             "scale": kw.get("scale", (1.5,) * 3)}
    p, = _writer.write_vesicles_imod(str(tmp_path / "v"), data, attrs)
    assert p.endswith(".mod") and len(read_imod_model(p)) == len(t.accepted())
    with pytest.raises(ValueError, match="voxel size is unknown"):
        _writer.write_labels_mrc(str(tmp_path / "l.mrc"), np.zeros((2, 3, 4), np.uint16), {"scale": (1.0,) * 3})
