"""The network that tiles run through (``UNetModel.predictor``), the tile budget, and the blending."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryoves import predict as P
from cryoves.model import _Bf16Forward, new_model


def _spread(model):
    """Outputs spread over 0..1 (an untrained net's sigmoid sits near 0.5)."""
    last = [lyr for lyr in model.keras_model.layers if type(lyr).__name__ == "Conv3D"][-1]
    w, b = last.get_weights()
    last.set_weights([w * 40.0, b])
    model.invalidate_inference_model()
    return model


@pytest.mark.parametrize("arch, shape", [
    ({}, (2, 24, 32, 20)),                                    # the default architecture, a batch of 2
    ({"n_depth": 1}, (1, 2, 6, 4)),                           # thinner than the final slabs
    ({"n_depth": 3, "n_conv_per_depth": 3}, (1, 16, 24, 32)),
])
def test_bf16_predictor_equals_the_keras_graph_up_to_bf16_rounding(arch, shape):
    model = _spread(new_model(seed=4, n_filter_base=4, **arch))
    keras_net = model.inference_model("bfloat16")
    pred = model.predictor("bfloat16")
    assert isinstance(pred, _Bf16Forward) and model.predictor("bfloat16") is pred  # cached
    x = np.random.default_rng(2).normal(size=shape + (1,)).astype(np.float32)
    a, b = np.asarray(keras_net.predict_on_batch(x)), pred.predict_on_batch(x)
    assert b.shape == a.shape and b.dtype == np.float32
    diff = np.abs(a - b)
    assert diff.max() < 0.02 and diff.mean() < 2e-3  # bfloat16 rounding, not another function
    assert a.std() > 0.05


def test_predictor_in_float32_is_the_keras_graph():
    model = new_model(seed=1, n_filter_base=4)
    assert model.predictor("float32") is model.inference_model("float32")


def test_predictor_follows_weight_changes():
    model = new_model(seed=5, n_filter_base=4)
    first = model.predictor("bfloat16")
    conv = [lyr for lyr in model.keras_model.layers if type(lyr).__name__ == "Conv3D"][-1]
    w, b = conv.get_weights()
    conv.set_weights([w, b + 1.0])
    assert model.predictor("bfloat16") is not first


def test_tile_budget(monkeypatch):
    model = new_model(seed=0, n_filter_base=4)
    monkeypatch.setenv("CRYOVES_PRECISION", "bfloat16")
    assert P.tile_budget((160, 384, 384), 9_000_000, model) == int(9_000_000 * P.BF16_TILE_VOXELS_FACTOR)
    # no model: the default weights' architecture, read from their card
    assert P.tile_budget((160, 384, 384), 9_000_000) == int(9_000_000 * P.BF16_TILE_VOXELS_FACTOR)
    big = (P.STREAM_VOXELS // (512 * 512) + 1, 512, 512)  # a large volume keeps its own budget
    assert P.tile_budget(big, 9_000_000, model) == P.STREAM_MAX_TILE_VOXELS
    monkeypatch.setenv("CRYOVES_PRECISION", "float32")
    assert P.tile_budget((160, 384, 384), 9_000_000, model) == 9_000_000


def test_bf16_prediction_plans_with_the_larger_budget(monkeypatch):
    model = new_model(seed=6, n_depth=1, n_filter_base=4, voxel_size_nm=1.0)
    tomo = np.random.default_rng(0).normal(size=(20, 40, 40)).astype(np.float32)
    plans = []
    real = P.plan_tiles
    monkeypatch.setattr(P, "plan_tiles", lambda *a, **k: plans.append(k["max_tile_voxels"]) or real(*a, **k))
    for precision in ("float32", "bfloat16"):
        monkeypatch.setenv("CRYOVES_PRECISION", precision)
        P.predict_probability(tomo, 1.0, model, max_tile_voxels=20_000)
    assert plans == [20_000, int(20_000 * P.BF16_TILE_VOXELS_FACTOR)]


@pytest.mark.parametrize("inv_n", [1.0, 0.125])
def test_blend_tile_equals_the_whole_tile_expression(inv_n):
    """Blending only a tile's kept region, adding ``p`` as it is where the weight is 1, is bit for bit
    ``out += p * ((wz * wy) * wx * inv_n)`` on the whole tile."""
    rng = np.random.default_rng(3)
    plan = P.plan_tiles((40, 90, 70), divisor=4, halo=9, blend=5, tile_shape=(40, 48, 40))
    p = ndimage.uniform_filter(rng.random(plan.tile_shape), 3).astype(np.float32)
    inv = np.float32(inv_n)
    got = rng.random((40, 90, 70)).astype(np.float32)
    ref = got.copy()
    for origin in plan.tiles():
        ws = [plan.axis_weights(ax, o).astype(np.float32) for ax, o in enumerate(origin)]
        ext = tuple(min(t, n - o) for t, n, o in zip(plan.tile_shape, ref.shape, origin))
        P._blend_tile(got, p, origin, ext, ws, inv)
        wz, wy, wx = (w[:k] for w, k in zip(ws, ext))
        w = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        w *= inv
        box = tuple(slice(o, o + k) for o, k in zip(origin, ext))
        ref[box] += p[:ext[0], :ext[1], :ext[2]] * w
    assert np.array_equal(got, ref)
