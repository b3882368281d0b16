"""Training: patches, augmentation alignment, loss, best-weights saving, fine-tuning CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cryoves.train import PatchSampler, TrainingParams, TrainingVolume, _dice_np, _loss_np, train_model


def _toy_volume(seed=0, shape=(40, 40, 40)):
    """Dark shells (filled-sphere masks) in noise: a learnable toy problem."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    img = rng.normal(0, 0.3, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    for _ in range(6):
        c = rng.uniform(8, np.array(shape) - 8)
        r = rng.uniform(4, 7)
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        img[np.abs(d - r + 1) < 1.0] -= 2.0
        mask[d <= r] = 1
    return TrainingVolume(img, mask, f"toy{seed}")


def test_params_validation():
    with pytest.raises(ValueError, match="multiple of 4"):
        TrainingParams(patch_size=30)
    with pytest.raises(ValueError, match="epochs"):
        TrainingParams(epochs=0)


def test_patches_hold_foreground_and_augmentation_keeps_alignment():
    vol = _toy_volume()
    params = TrainingParams(patch_size=16, batch_size=8, min_foreground_fraction=0.05)
    sampler = PatchSampler([vol], params, np.random.default_rng(1))
    x, y = sampler.batch(augment=False)
    assert x.shape == (8, 16, 16, 16, 1) and y.shape == x.shape
    assert (y.reshape(8, -1).mean(1) >= 0.05).mean() > 0.8
    # alignment: image and mask of an augmented patch still agree (shell voxels are dark,
    # and the dark shell lies at the mask's boundary), so the correlation is preserved
    xa, ya = sampler.batch(augment=True)
    for xi, yi in zip(xa[..., 0], ya[..., 0]):
        if 0.05 < yi.mean() < 0.95:
            from scipy import ndimage as ndi
            edge = yi.astype(bool) & ~ndi.binary_erosion(yi.astype(bool))
            assert xi[edge].mean() < xi[~yi.astype(bool)].mean()


def test_sampler_rejects_too_small_volumes():
    with pytest.raises(ValueError, match="smaller than one"):
        small = TrainingVolume(np.zeros((12, 40, 40), np.float32), np.ones((12, 40, 40), np.uint8))
        PatchSampler([small], TrainingParams(patch_size=16), np.random.default_rng(0))


def test_loss_and_dice_numpy():
    y = np.zeros((1, 4, 4, 4, 1), np.float32)
    y[0, :2] = 1
    assert _dice_np(y, y) == 1.0
    assert _dice_np(y, 1 - y) == 0.0
    assert _loss_np(y, y * 0.98 + 0.01, 3.0, 1.0) < _loss_np(y, np.full_like(y, 0.5), 3.0, 1.0)


def test_training_learns_and_saves_best(tmp_path):
    from cryoves.model import load_model, new_model

    model = new_model(name="toy", seed=0, n_filter_base=8)
    vols = [_toy_volume(0), _toy_volume(1)]
    params = TrainingParams(patch_size=24, batch_size=4, epochs=4, steps_per_epoch=12, learning_rate=3e-3,
                            n_validation_patches=8, min_foreground_fraction=0.05)
    stem = tmp_path / "toy"
    model, hist = train_model(vols, [_toy_volume(2)], model=model, params=params, out_stem=stem,
                              card_updates={"training_data": "toy shells"})
    assert len(hist.val_dice) == 4
    assert hist.loss[-1] < hist.loss[0]
    assert hist.best_val_dice == max(hist.val_dice)
    for suffix in (".weights.h5", ".json", "_history.json", "_history.png"):
        assert (tmp_path / f"toy{suffix}").is_file()
    card = json.loads((tmp_path / "toy.json").read_text())
    assert card["training_data"] == "toy shells"
    assert card["metrics"]["val_dice"] == pytest.approx(hist.best_val_dice, abs=1e-4)
    # the saved weights are the best epoch's, and reload to the same predictions
    again = load_model(stem.with_suffix(".weights.h5"))
    x = vols[0].image[None, :24, :24, :24, None]
    np.testing.assert_allclose(np.asarray(again.keras_model(x, training=False)),
                               np.asarray(model.keras_model(x, training=False)), atol=1e-5)


def test_cli_fine_tunes_on_user_labels(tmp_path, small_simulation):
    import mrcfile

    from cryoves.cli import main
    from cryoves.model import load_model, new_model

    base = new_model(name="base", seed=0, n_filter_base=8)
    base.save(tmp_path / "base")
    tomo, lab = tmp_path / "t.mrc", tmp_path / "l.mrc"
    for path, data in ((tomo, small_simulation.tomogram.astype(np.float32)), (lab, small_simulation.labels)):
        with mrcfile.new(path) as m:
            m.set_data(data)
            m.voxel_size = small_simulation.voxel_size * 10
    before = tomo.read_bytes()
    out = tmp_path / "tuned"
    rc = main(["train", "--out", str(out), "--data", f"{tomo}:{lab}", "--init-weights",
               str(tmp_path / "base.weights.h5"), "--epochs", "1", "--steps", "2", "--patch", "16",
               "--batch-size", "2", "--lr", "1e-4"])
    assert rc == 0
    tuned = load_model(str(out) + ".weights.h5")
    assert "fine-tuned from" in tuned.card.source
    assert tuned.card.voxel_size_nm == base.card.voxel_size_nm
    assert tomo.read_bytes() == before  # input untouched
    # refuses to overwrite
    assert main(["train", "--out", str(out), "--data", f"{tomo}:{lab}", "--epochs", "1", "--steps", "1",
                 "--patch", "16"]) == 2


torch_available = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


@pytest.mark.skipif(not torch_available, reason="PyTorch not installed (the torch backend is optional)")
def test_weights_trained_on_torch_backend_load_in_tensorflow(tmp_path):
    """GPU machines train with Keras on the torch backend; the weights must load in TensorFlow unchanged."""
    code = f"""
import os, numpy as np
os.environ["KERAS_BACKEND"] = "torch"
from cryoves.model import new_model
from cryoves.train import TrainingParams, TrainingVolume, train_model
rng = np.random.default_rng(0)
img = rng.normal(size=(32, 32, 32)).astype("float32"); mask = (img > 1).astype("uint8")
m, h = train_model([TrainingVolume(img, mask)], model=new_model(seed=0, n_filter_base=8),
                   params=TrainingParams(patch_size=16, batch_size=2, epochs=1, steps_per_epoch=2,
                                         n_validation_patches=2, min_foreground_fraction=0.0),
                   out_stem=r"{tmp_path / 'torch_model'}")
x = img[None, :16, :16, :16, None]
np.save(r"{tmp_path / 'pred.npy'}", np.asarray(m.keras_model(x, training=False).detach().cpu()))
import sys, keras
assert keras.backend.backend() == "torch"
assert "csbdeep" not in sys.modules  # csbdeep needs TensorFlow, which GPU machines lack
"""
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from cryoves.model import load_model

    m = load_model(tmp_path / "torch_model.weights.h5")
    img = np.random.default_rng(0).normal(size=(32, 32, 32)).astype("float32")
    pred = np.asarray(m.keras_model(img[None, :16, :16, :16, None], training=False))
    np.testing.assert_allclose(pred, np.load(tmp_path / "pred.npy"), atol=1e-4)


def test_appearance_augmentation_varies_noise_and_blur_but_keeps_spread():
    """The appearance augmentation must change the texture (noise, smoothing) of patches
    while keeping their intensity spread near the normalised one (as a global normalisation
    at prediction time would), so the network cannot rely on one simulator's noise."""
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (40, 40, 40)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[10:30, 10:30, 10:30] = 1
    params = TrainingParams(patch_size=32, min_foreground_fraction=0.0)
    s = PatchSampler([TrainingVolume(img, mask)], params, np.random.default_rng(1))
    roughness, spreads = [], []
    for _ in range(60):
        x, y = s._crop()
        x, y = s._augment(x, y)
        spreads.append(float(x.std()))
        # neighbour correlation: ~0 for white noise, high after smoothing
        roughness.append(float(np.corrcoef(x[:, :, 1:].ravel(), x[:, :, :-1].ravel())[0, 1]))
    assert max(roughness) > 0.5 and min(roughness) < 0.1  # some patches smoothed, some left white
    assert min(spreads) > 0.4 and max(spreads) < 2.0  # rescaled after noise or smoothing
