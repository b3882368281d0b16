"""Tests of cryoves.model: U-Net, model card, saving/loading, reference CryoVesNet weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cryoves.model import (ModelCard, UNetModel, build_unet, default_weights_path,
                           describe_weights, get_model, load_model, load_reference_weights,
                           new_model, receptive_field, resolve_weights)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get(
    "CRYOVES_REFERENCE_WEIGHTS",
    REPO.parent / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"))
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_file(), reason=f"reference CryoVesNet weights not found at {REFERENCE}")


def _card(**kw):
    data = dict(name="t", architecture={"n_filter_base": 4}, voxel_size_nm=2.2,
                normalization={"method": "percentile", "p_low": 1, "p_high": 99.8})
    data.update(kw)
    return ModelCard(**data)


# ------------------------------------------------------------------------- model card
def test_card_roundtrip_and_float_percentiles():
    card = _card(invert=True, metrics={"dice": 0.8}, training_data="sim")
    assert card.normalization["p_low"] == 1.0 and isinstance(card.normalization["p_low"], float)
    assert card.normalization["p_high"] == 99.8
    assert card.architecture["n_depth"] == 2 and card.architecture["kernel_size"] == 3
    back = ModelCard.from_json(card.to_json())
    assert back == card
    assert json.loads(card.to_json())["normalization"]["p_high"] == 99.8


def test_card_missing_keys_and_bad_values():
    with pytest.raises(ValueError, match="missing required key.*voxel_size_nm"):
        ModelCard.from_dict({"name": "x", "architecture": {},
                             "normalization": {"method": "zscore"}})
    with pytest.raises(ValueError, match="voxel_size_nm"):
        _card(voxel_size_nm=0)
    with pytest.raises(ValueError, match="normalization method"):
        _card(normalization={"method": "minmax"})
    with pytest.raises(ValueError, match="p_high"):
        _card(normalization={"method": "percentile", "p_low": 1.0})
    with pytest.raises(ValueError, match="p_low < p_high"):
        _card(normalization={"method": "percentile", "p_low": 99.0, "p_high": 1.0})
    with pytest.raises(ValueError, match="unknown architecture"):
        _card(architecture={"n_levels": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelCard.from_json("{not json")


def test_card_preprocessing_field_and_backward_compatibility():
    # a card written before 'smooth_sigma' existed loads and means "no smoothing"
    old = json.loads(_card().to_json())
    del old["smooth_sigma"]
    card = ModelCard.from_dict(old)
    assert card.smooth_sigma == 0.0 and "ignored" not in card.notes
    assert card.preprocessing == {"smooth_sigma": 0.0, "invert": False,
                                  "normalization": {"method": "percentile", "p_low": 1.0,
                                                    "p_high": 99.8}}
    smoothed = card.with_preprocessing(smooth_sigma=1, normalization={"method": "zscore"})
    assert smoothed.smooth_sigma == 1.0 and isinstance(smoothed.smooth_sigma, float)
    assert smoothed.normalization == {"method": "zscore"}
    assert card.smooth_sigma == 0.0 and card.normalization["method"] == "percentile"
    back = ModelCard.from_json(smoothed.to_json())
    assert back == smoothed and json.loads(smoothed.to_json())["smooth_sigma"] == 1.0
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sigma'\]; allowed"):
        card.with_preprocessing(sigma=1.0)
    for bad in (-0.5, float("nan"), "one", True, 11):
        with pytest.raises(ValueError, match="smooth_sigma"):
            card.with_preprocessing(smooth_sigma=bad)
    with pytest.raises(ValueError, match="invert"):
        card.with_preprocessing(invert="false")
    with pytest.raises(ValueError, match="normalization method"):
        card.with_preprocessing(normalization={"method": "minmax"})


def test_card_written_with_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        w = new_model(seed=6, n_filter_base=4).save(tmp_path / "perm")
    finally:
        os.umask(old)
    assert (tmp_path / "perm.json").stat().st_mode & 0o777 == 0o644
    assert w.stat().st_mode & 0o777 == 0o644


def test_card_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(_card().to_json())
    assert ModelCard.from_json(p).name == "t"
    with pytest.raises(FileNotFoundError):
        ModelCard.from_json(tmp_path / "missing.json")


# ------------------------------------------------------------------------- architecture
def test_build_unet_default_architecture():
    net = build_unet()
    assert net.count_params() == 250641  # the CryoVesNet U-Net: ~250k parameters
    assert tuple(net.input.shape) == (None, None, None, None, 1)
    convs = [lyr for lyr in net.layers if type(lyr).__name__ == "Conv3D"]
    assert [c.filters for c in convs] == [16, 16, 32, 32, 64, 32, 32, 16, 16, 16, 1]
    assert convs[-1].kernel_size == (1, 1, 1)
    out = net.predict_on_batch(np.zeros((1, 12, 16, 20, 1), np.float32))
    assert out.shape == (1, 12, 16, 20, 1)
    assert np.all((out >= 0) & (out <= 1))


def test_receptive_field_formula_and_impulse():
    assert receptive_field(2, 3, 2) == (44, 23)
    assert receptive_field(1, 3, 2) == (18, 9)
    # Empirical check: perturbing one voxel changes outputs only within the radius.
    model = new_model(seed=0, n_filter_base=4)
    net = model.inference_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 64, 64, 64, 1)).astype(np.float32)
    base = net.predict_on_batch(x)[0, ..., 0]
    _, radius = model.receptive_field
    for c in (30, 31, 32, 33):
        x2 = x.copy()
        x2[0, c, c, c, 0] += 100.0
        diff = np.abs(net.predict_on_batch(x2)[0, ..., 0] - base) > 0
        for ax in range(3):
            idx = np.nonzero(diff.any(axis=tuple(a for a in range(3) if a != ax)))[0]
            assert idx.min() >= c - radius and idx.max() <= c + radius
            assert idx.max() - idx.min() >= 30  # and the field really is large


def test_inference_model_matches_keras_model():
    model = new_model(seed=1, n_filter_base=4)
    # give batch norm non-trivial statistics so the folding is really exercised
    rng = np.random.default_rng(1)
    for lyr in model.keras_model.layers:
        if type(lyr).__name__ == "BatchNormalization":
            g, b, m, v = lyr.get_weights()
            lyr.set_weights([rng.uniform(0.5, 1.5, g.shape).astype(np.float32),
                             rng.normal(0, 0.2, b.shape).astype(np.float32),
                             rng.normal(0, 0.2, m.shape).astype(np.float32),
                             rng.uniform(0.2, 2.0, v.shape).astype(np.float32)])
    model.invalidate_inference_model()
    x = rng.normal(size=(2, 16, 24, 20, 1)).astype(np.float32)
    a = model.keras_model.predict_on_batch(x)
    b = model.inference_model().predict_on_batch(x)
    np.testing.assert_allclose(a, b, atol=2e-5)


# ------------------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path):
    model = new_model(name="tiny", seed=2, n_filter_base=4, voxel_size_nm=1.7,
                      normalization={"method": "percentile", "p_low": 0.5, "p_high": 99.5})
    written = model.save(tmp_path / "sub" / "tiny")
    assert written == tmp_path / "sub" / "tiny.weights.h5"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tiny.json", "tiny.weights.h5"]
    for target in (written, tmp_path / "sub", tmp_path / "sub" / "tiny.json", str(written)):
        loaded = load_model(target)
        assert isinstance(loaded, UNetModel)
        assert loaded.card == model.card
        for a, b in zip(model.keras_model.get_weights(), loaded.keras_model.get_weights()):
            np.testing.assert_array_equal(a, b)
    # overwrite in place works and leaves no temporary files
    model.save(written)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tiny.json", "tiny.weights.h5"]


def test_load_errors(tmp_path):
    model = new_model(seed=3, n_filter_base=4)
    w = model.save(tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(FileNotFoundError, match="model card"):
        load_model(w)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing.weights.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="bad.h5 is not a valid HDF5 weights file"):
        load_model(bad)
    # a valid HDF5 file that is neither cryoves nor reference weights
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["data"] = np.zeros(3)
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "other.h5")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no NAME.weights.h5"):
        load_model(empty)
    # a card whose architecture does not match the weights
    model.save(tmp_path / "x")
    card = json.loads((tmp_path / "x.json").read_text())
    card["architecture"]["n_filter_base"] = 8
    (tmp_path / "x.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not fit") as err:
        load_model(tmp_path / "x.weights.h5")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg  # one line, not Keras' long report
    assert "x.weights.h5" in msg and "x.json" in msg and "n_filter_base=8" in msg
    assert "(3, 3, 3, 1, 4)" in msg and "(3, 3, 3, 1, 8)" in msg  # what differs
    # another depth: the numbers of layers differ
    card["architecture"].update(n_filter_base=4, n_depth=1)
    (tmp_path / "x.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"the file has 11 conv3d layer\(s\) with weights, "
                                         r"the card's network 7"):
        load_model(tmp_path / "x.weights.h5")


@pytest.mark.parametrize("damage", ["text", "truncated", "empty"])
def test_damaged_weights_file_is_named(tmp_path, damage):
    """A non-HDF5 or truncated NAME.weights.h5 (with its card) is reported as such."""
    model = new_model(seed=3, n_filter_base=4)
    w = model.save(tmp_path / "m")
    data = w.read_bytes()
    if damage == "text":
        w.write_text("this is not HDF5\n")
    elif damage == "truncated":
        w.write_bytes(data[: len(data) // 2])
    else:
        w.write_bytes(b"")
    for call in (load_model, describe_weights, get_model):
        with pytest.raises(ValueError, match=r"m\.weights\.h5 is not a valid HDF5 weights file"):
            call(w)


def test_default_weights(tmp_path, monkeypatch):
    import cryoves._resources as res

    monkeypatch.setattr(res, "weights_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="reference CryoVesNet"):
        load_model()
    model = new_model(name="shipped", seed=4, n_filter_base=4)
    model.save(tmp_path / "shipped")
    assert default_weights_path() == tmp_path / "shipped.weights.h5"
    assert load_model().card.name == "shipped"


# ------------------------------------------------------------------------- resolver, cache
def test_describe_weights_without_tensorflow(tmp_path):
    import subprocess
    import sys

    model = new_model(name="tiny", seed=7, n_filter_base=4, voxel_size_nm=1.7)
    model.card = model.card.with_preprocessing(smooth_sigma=0.5)
    w = model.save(tmp_path / "tiny")
    for target in (w, tmp_path, tmp_path / "tiny.json"):
        d = describe_weights(target)
        assert d["name"] == "tiny" and d["kind"] == "cryoves" and d["is_reference"] is False
        assert d["path"] == str(w.resolve()) and d["card_path"] == str(tmp_path / "tiny.json")
        assert d["voxel_size_nm"] == 1.7
        assert d["preprocessing"]["smooth_sigma"] == 0.5
        assert d["n_params"] == model.count_params()
        assert "1.7 nm" in d["summary"] and "sigma 0.5" in d["summary"]
    assert resolve_weights(tmp_path) == w.resolve()
    # the default weights, described in a fresh interpreter that never imports TensorFlow
    code = ("import sys, json; from cryoves.model import describe_weights; "
            "d = describe_weights(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
            "print(json.dumps([d['name'], d['n_params'], d['voxel_size_nm'], bad]))")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    name, n_params, vs, imported = json.loads(out.strip().splitlines()[-1])
    assert name == "cryoves_default" and n_params == 250641 and vs == 2.2
    assert imported == []
    with pytest.raises(FileNotFoundError):
        describe_weights(tmp_path / "missing.weights.h5")


def test_get_model_caches_by_path_and_mtime(tmp_path):
    import threading

    w = new_model(name="cached", seed=8, n_filter_base=4).save(tmp_path / "c")
    first = get_model(w)
    assert get_model(str(w)) is first and get_model(tmp_path / "c.json") is first
    assert get_model(tmp_path) is first
    # concurrent callers share one model
    got = []
    threads = [threading.Thread(target=lambda: got.append(get_model(w))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(m is first for m in got)
    # editing the card on disk reloads the model with the new card
    card = json.loads((tmp_path / "c.json").read_text())
    card["smooth_sigma"] = 1.5
    (tmp_path / "c.json").write_text(json.dumps(card))
    st = (tmp_path / "c.json").stat()
    os.utime(tmp_path / "c.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    second = get_model(w)
    assert second is not first and second.card.smooth_sigma == 1.5
    assert get_model(w) is second
    # load_model always builds a private copy
    assert load_model(w) is not second


# ------------------------------------------------------------------------- reference
@pytest.mark.reference
@needs_reference
def test_reference_weights_transferred_exactly():
    import h5py

    model = load_reference_weights(REFERENCE)
    arch = model.card.architecture
    assert arch["n_depth"] == 2 and arch["n_filter_base"] == 16 and arch["dropout"] == 0.2
    assert model.card.voxel_size_nm == 2.2
    assert model.card.normalization == {"method": "zscore"}
    assert model.card.smooth_sigma == 1.0  # the reference inference smooths (sigma 1 voxel)
    assert model.card.invert is False
    d = describe_weights(REFERENCE)
    assert d["is_reference"] and d["kind"] == "reference" and d["card_path"] is None
    assert d["n_params"] == 250641 and d["voxel_size_nm"] == 2.2
    assert d["preprocessing"] == {"smooth_sigma": 1.0, "normalization": {"method": "zscore"},
                                  "invert": False}
    assert get_model(REFERENCE) is get_model(REFERENCE.parent)
    assert "GPL-3.0" in model.card.source
    assert model.count_params() == 250641
    with h5py.File(REFERENCE, "r") as fh:
        mw = fh["model_weights"]
        ref = {}
        for name in mw:
            for wn in mw[name].attrs.get("weight_names", []):
                wn = wn.decode() if isinstance(wn, bytes) else wn
                ref[wn] = np.asarray(mw[name][wn])
    n_ref = sum(a.size for a in ref.values())
    assert n_ref == model.count_params()
    # every reference array appears, in graph order, in the rebuilt model
    ours = [w for lyr in model.keras_model.layers for w in lyr.get_weights()]
    used = set()
    for arr in ours:
        match = [k for k, v in ref.items()
                 if k not in used and v.shape == arr.shape and np.array_equal(v, arr)]
        assert match, f"weight of shape {arr.shape} not found in the reference file"
        used.add(match[0])
    assert used == set(ref)
    # and via load_model's auto-detection
    again = load_model(REFERENCE)
    assert again.card.name == "cryovesnet-reference"


def _shell_tomogram(shape=(48, 96, 96), seed=0):
    """Dark-bilayer vesicle shells with a bright fringe in noise (2.2 nm voxels)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    tomo = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    centers = [(24, 26, 28), (24, 30, 68), (22, 70, 30), (26, 68, 70)]
    for i, c in enumerate(centers):
        r = 9.0  # ~20 nm
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        tomo -= np.exp(-0.5 * ((d - r) / 1.0) ** 2)  # dark membrane
        tomo += 0.4 * np.exp(-0.5 * ((d - r - 2.2) / 0.8) ** 2)  # Fresnel fringe
        labels[d <= r + 1] = i + 1
    tomo += rng.normal(0, 0.35, shape).astype(np.float32)
    return tomo, labels


@pytest.mark.reference
@needs_reference
def test_reference_weights_give_sensible_probabilities():
    from cryoves.predict import predict_probability

    try:
        from cryoves.simulate import simulate_tomogram

        sim = simulate_tomogram((48, 128, 128), voxel_size=2.2, seed=5)
        tomo, labels = sim.tomogram, sim.labels
    except ImportError:  # pragma: no cover - simulator not available
        tomo, labels = _shell_tomogram()
    model = load_reference_weights(REFERENCE)
    prob = predict_probability(tomo, 2.2, model)  # with its own preprocessing (sigma 1)
    inside = labels > 0
    assert inside.sum() > 1000
    p_in, p_out = prob[inside].mean(), prob[~inside].mean()
    assert p_in > 0.7, p_in
    assert p_in > 3 * p_out, (p_in, p_out)
    # the per-call override really changes the input the network sees
    raw = predict_probability(tomo, 2.2, model, preprocessing={"smooth_sigma": 0})
    assert np.abs(raw - prob).mean() > 0.01


def test_inference_model_follows_weight_changes():
    model = new_model(seed=5, n_filter_base=4)
    x = np.random.default_rng(5).normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    first = model.inference_model()
    assert model.inference_model() is first  # cached while the weights are unchanged
    last = [lyr for lyr in model.keras_model.layers if type(lyr).__name__ == "Conv3D"][-1]
    w, b = last.get_weights()
    last.set_weights([w, b + 3.0])  # e.g. training changed the weights
    np.testing.assert_allclose(model.inference_model().predict_on_batch(x),
                               model.keras_model.predict_on_batch(x), atol=2e-5)
