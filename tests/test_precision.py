"""The U-Net's prediction arithmetic: float32 or bfloat16 (``cryoves.model.inference_precision``)."""

from __future__ import annotations

import numpy as np
import pytest

from cryoves import model as model_mod
from cryoves.evaluate import match_vesicles
from cryoves.model import get_model, inference_precision, new_model
from cryoves.pipeline import segment
from cryoves.predict import predict_probability


def test_precision_from_environment(monkeypatch):
    monkeypatch.setenv("CRYOVES_PRECISION", "bfloat16")
    assert inference_precision() == "bfloat16"
    monkeypatch.setenv("CRYOVES_PRECISION", "float32")
    assert inference_precision() == "float32"
    monkeypatch.setenv("CRYOVES_PRECISION", "auto")
    native = model_mod._native_bf16()
    assert inference_precision() == ("bfloat16" if native else "float32")
    assert native == model_mod._cpu_has_bf16()  # TensorFlow on a CPU here
    monkeypatch.setenv("CRYOVES_PRECISION", "half")
    with pytest.raises(ValueError, match="CRYOVES_PRECISION must be auto, float32 or bfloat16, got 'half'"):
        inference_precision()
    with pytest.raises(ValueError, match="precision must be one of"):
        new_model(seed=0, n_filter_base=4).inference_model("float16")


def test_bfloat16_network():
    model = new_model(seed=3, n_filter_base=4)
    last = [lyr for lyr in model.keras_model.layers if type(lyr).__name__ == "Conv3D"][-1]
    w, b = last.get_weights()
    last.set_weights([w * 40.0, b])  # outputs spread over 0..1
    f32 = model.inference_model("float32")
    bf16 = model.inference_model("bfloat16")
    assert bf16 is not f32 and model.inference_model("bfloat16") is bf16  # cached per precision
    convs = [lyr for lyr in bf16.layers if type(lyr).__name__ == "Conv3D"]
    assert all(lyr.compute_dtype == "bfloat16" for lyr in convs[:-1])
    assert convs[-1].compute_dtype == "float32" and bf16.layers[-1].compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in bf16.weights)  # weights stay float32
    x = np.random.default_rng(3).normal(size=(1, 24, 32, 32, 1)).astype(np.float32)
    a, c = f32.predict_on_batch(x), np.asarray(bf16.predict_on_batch(x))
    assert c.dtype == np.float32 and a.std() > 0.1
    diff = np.abs(a - c)
    assert 0 < diff.max() < 0.05 and diff.mean() < 5e-3


def test_bfloat16_segmentation(monkeypatch, small_simulation):
    """The default weights in bfloat16 find the same vesicles as in float32."""
    sim = small_simulation
    model = get_model(None)
    prob = {}
    tables = {}
    for precision in ("float32", "bfloat16"):
        monkeypatch.setenv("CRYOVES_PRECISION", precision)
        prob[precision] = predict_probability(sim.tomogram, sim.voxel_size, model)
        tables[precision] = segment(sim.tomogram, sim.voxel_size, model).table.accepted()
    diff = np.abs(prob["float32"] - prob["bfloat16"])
    assert 0 < diff.max() < 0.1 and diff.mean() < 1e-3
    assert len(tables["float32"]) >= 3
    m = match_vesicles(tables["bfloat16"], tables["float32"])
    assert m.f1 == 1.0
    if m.pairs.size:
        d = np.linalg.norm(tables["bfloat16"].centers[m.pairs[:, 0]] - tables["float32"].centers[m.pairs[:, 1]], axis=1)
        assert d.max() < 0.5  # voxels
