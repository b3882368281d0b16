"""Training and fine-tuning of the vesicle U-Net.

Data come from the simulator (:func:`simulated_training_data`, domain-randomised) or from a
user's own tomogram with labels (:func:`volume_pair` — a label MRC, or a vesicle table
rendered to labels). Every volume is resampled to the model's voxel size and preprocessed
exactly as at prediction time (:func:`cryoves.predict.preprocess` with the model card's
``preprocessing``: inversion, smoothing, normalisation), so a trained model sees at
inference what it saw in training.

Patches (default 48³) are drawn at random, kept when they hold enough vesicle voxels (the
paper keeps 32³ patches with > 1000 vesicle voxels, i.e. ~3 %; we use the same fraction),
augmented (flips, 90° rotations about Z, gain/offset, contrast curve, white and correlated
noise, smoothing, Z blur: :meth:`PatchSampler._augment`), and
fed to Keras 3 (TensorFlow backend here; the torch backend works too, for GPU machines
without TensorFlow). The loss is foreground-weighted binary cross-entropy plus soft Dice:
BCE for calibrated probabilities, Dice against the class imbalance of small vesicles.
Validation Dice (threshold 0.5, fixed validation patches) is tracked every epoch and the
best weights are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from cryoves._progress import ProgressCallback, report

__all__ = ["TrainingParams", "TrainingVolume", "volume_pair", "simulated_training_data",
           "PatchSampler", "train_model", "TrainingHistory"]


@dataclass
class TrainingVolume:
    """One training volume on the model's grid: normalised image and binary vesicle mask."""

    image: np.ndarray  # float32, normalised
    mask: np.ndarray  # uint8 0/1
    source: str = ""


@dataclass
class TrainingParams:
    """Training settings (defaults: the paper's Adam 1e-3, BCE with foreground weight, Dice)."""

    patch_size: int = 48
    batch_size: int = 4
    epochs: int = 30
    steps_per_epoch: int = 100
    learning_rate: float = 1e-3
    foreground_weight: float = 3.0
    dice_weight: float = 1.0
    min_foreground_fraction: float = 1000 / 32**3
    n_validation_patches: int = 48
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.patch_size % 4 or self.patch_size < 16:
            raise ValueError(f"patch_size must be a multiple of 4 and >= 16 (the U-Net pools twice), got {self.patch_size}")
        for name in ("batch_size", "epochs", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.min_foreground_fraction < 1:
            raise ValueError("min_foreground_fraction must be in [0, 1)")


@dataclass
class TrainingHistory:
    loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_dice: list = field(default_factory=list)
    best_epoch: int = -1
    best_val_dice: float = float("nan")
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def _resample(vol: np.ndarray, factor: float, order: int) -> np.ndarray:
    if abs(factor - 1.0) < 1e-3:
        return vol
    if order == 0:
        return ndi.zoom(vol, factor, order=0, grid_mode=True, mode="grid-constant")
    if factor < 1:  # anti-alias before shrinking
        vol = ndi.gaussian_filter(vol.astype(np.float32), sigma=0.5 * (1 / factor - 1) ** 0.5 + 0.3)
    return ndi.zoom(vol.astype(np.float32), factor, order=order, grid_mode=True, mode="grid-mirror")


def _check_preprocessing(preprocessing) -> dict:
    if not isinstance(preprocessing, dict) or "normalization" not in preprocessing:
        raise TypeError("preprocessing must be a model card's preprocessing dict "
                        "(model.card.preprocessing: smooth_sigma, normalization, invert)")
    return preprocessing


def volume_pair(tomogram: np.ndarray, labels: np.ndarray, voxel_size: float, model_voxel_size: float,
                preprocessing: dict, source: str = "") -> TrainingVolume:
    """Prepare a (tomogram, labels) pair for training on a model of ``model_voxel_size`` nm.

    Parameters
    ----------
    tomogram, labels : ndarray
        3-D, of equal shape. ``labels`` may be a label volume or a binary mask (non-zero =
        vesicle, filled spheres).
    voxel_size, model_voxel_size : float
        nm; the pair is resampled from the first to the second.
    preprocessing : dict
        The model card's ``preprocessing`` (:attr:`cryoves.model.ModelCard.preprocessing`),
        applied after resampling exactly as :func:`cryoves.predict.predict_probability` does.
    source : str
        Description kept with the volume (model card provenance).
    """
    from cryoves.predict import preprocess

    preprocessing = _check_preprocessing(preprocessing)
    tomogram = np.asarray(tomogram)
    labels = np.asarray(labels)
    if tomogram.ndim != 3 or tomogram.shape != labels.shape:
        raise ValueError(f"tomogram {tomogram.shape} and labels {labels.shape} must be 3-D and of equal shape")
    if not np.any(labels):
        raise ValueError("the labels contain no vesicle voxel: nothing to learn from")
    factor = voxel_size / model_voxel_size
    image = _resample(tomogram.astype(np.float32), factor, order=1)
    mask = _resample((labels != 0).astype(np.float32), factor, order=1) > 0.5
    image = preprocess(image, preprocessing, copy=False)
    return TrainingVolume(image.astype(np.float32, copy=False), mask.astype(np.uint8), source)


def simulated_training_data(n_volumes: int, model_voxel_size: float, preprocessing: dict, *,
                            shape_nm: Sequence[float] = (160, 300, 300), seed: int = 1000,
                            voxel_size_range: tuple[float, float] = (1.0, 3.0),
                            progress: ProgressCallback = None) -> list[TrainingVolume]:
    """Simulate ``n_volumes`` domain-randomised tomograms and prepare them for training.

    Each volume is simulated at a random voxel size in ``voxel_size_range`` (so the
    resampling to ``model_voxel_size`` is part of what the network learns to tolerate)
    with every physics setting drawn by :func:`cryoves.simulate.random_params` (dose,
    voltage, defocus, tilt range, ice, damage, alignment error, CTF correction, membrane
    profiles, radii, crowding, distractors), then preprocessed with ``preprocessing``
    (the model card's). The rendering families in
    :data:`cryoves.simulate.HELD_OUT_FROM_TRAINING` are never drawn.
    """
    from cryoves.simulate import random_params, simulate_tomogram

    preprocessing = _check_preprocessing(preprocessing)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_volumes):
        report(progress, "simulate", i, n_volumes)
        vs = float(rng.uniform(*voxel_size_range))
        shape = tuple(int(round(s / vs / 4) * 4) for s in shape_nm)
        params = random_params(rng, voxel_size_range=(vs, vs))
        sim = simulate_tomogram(shape=shape, voxel_size=vs, seed=int(rng.integers(2**31)), params=params)
        out.append(volume_pair(sim.tomogram, sim.labels, vs, model_voxel_size, preprocessing,
                               source=f"simulated seed={seed} #{i} voxel={vs:.2f}nm"))
    report(progress, "simulate", n_volumes, n_volumes)
    return out


class PatchSampler:
    """Random, augmented patches from a list of :class:`TrainingVolume`."""

    def __init__(self, volumes: Sequence[TrainingVolume], params: TrainingParams, rng: np.random.Generator):
        if not volumes:
            raise ValueError("no training volume given")
        self.volumes = [v for v in volumes if min(v.image.shape) >= params.patch_size]
        if not self.volumes:
            p = params.patch_size
            raise ValueError(f"every training volume is smaller than one {p}³ patch on the model grid")
        self.params = params
        self.rng = rng
        weights = np.array([v.image.size for v in self.volumes], float)
        self._p = weights / weights.sum()

    def _crop(self):
        p = self.params.patch_size
        need = self.params.min_foreground_fraction * p**3
        for _ in range(50):
            v = self.volumes[self.rng.choice(len(self.volumes), p=self._p)]
            start = [int(self.rng.integers(0, s - p + 1)) for s in v.image.shape]
            sl = tuple(slice(s, s + p) for s in start)
            m = v.mask[sl]
            if m.sum() >= need:
                return v.image[sl], m
        return v.image[sl], m  # rare: accept a sparse patch rather than loop forever

    def _augment(self, x, y):
        """Geometry (flips, 90 degree turns about Z) and appearance randomisation.

        The appearance part stands for what differs between microscopes, reconstructions
        and simulators (the network must not learn one simulator's noise): global gain and
        offset, white or spatially correlated extra noise, smoothing (denoised or
        low-pass-filtered data), blur along Z only (missing-wedge elongation) and a
        monotone contrast curve. After a change of the noise level the patch is rescaled
        to its former spread, as the global normalisation at prediction time would do.
        """
        rng = self.rng
        for ax in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, ax), np.flip(y, ax)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        x = np.ascontiguousarray(x, np.float32)
        mean0, sd0 = float(x.mean()), float(x.std()) + 1e-6
        changed = False
        if rng.random() < 0.3:  # white noise
            x = x + rng.normal(0, rng.uniform(0.05, 0.5) * sd0, x.shape).astype(np.float32)
            changed = True
        if rng.random() < 0.25:  # spatially correlated noise (detector MTF, reconstruction filter)
            n = ndi.gaussian_filter(rng.normal(0, 1, x.shape).astype(np.float32), rng.uniform(0.6, 1.6))
            x = x + n * (rng.uniform(0.1, 0.5) * sd0 / (float(n.std()) + 1e-6))
            changed = True
        if rng.random() < 0.35:  # smoothed / denoised data
            x = ndi.gaussian_filter(x, rng.uniform(0.3, 1.4))
            changed = True
        if rng.random() < 0.2:  # extra elongation along Z (narrower tilt range)
            x = ndi.gaussian_filter(x, (rng.uniform(0.6, 1.6), 0, 0))
            changed = True
        if changed:
            x = (x - x.mean()) / (float(x.std()) + 1e-6) * sd0 + mean0
        if rng.random() < 0.25:  # monotone contrast curve around the mean
            t = (x - mean0) / sd0
            x = mean0 + sd0 * np.tanh(t * rng.uniform(0.5, 1.0)) / rng.uniform(0.5, 1.0)
        x = x * rng.uniform(0.8, 1.25) + rng.normal(0, 0.1)
        return x.astype(np.float32, copy=False), y

    def batch(self, n: int | None = None, augment: bool | None = None):
        n = n or self.params.batch_size
        augment = self.params.augment if augment is None else augment
        xs, ys = [], []
        for _ in range(n):
            x, y = self._crop()
            if augment:
                x, y = self._augment(x, y)
            xs.append(np.ascontiguousarray(x, np.float32))
            ys.append(np.ascontiguousarray(y, np.float32))
        return np.stack(xs)[..., None], np.stack(ys)[..., None]


# --------------------------------------------------------------------------------------
# loss, metric, loop
# --------------------------------------------------------------------------------------
def _loss_fn(keras, foreground_weight: float, dice_weight: float):
    ops = keras.ops

    def loss(y_true, y_pred):
        eps = 1e-6
        p = ops.clip(y_pred, eps, 1 - eps)
        w = 1.0 + (foreground_weight - 1.0) * y_true
        bce = -ops.mean(w * (y_true * ops.log(p) + (1 - y_true) * ops.log(1 - p)))
        inter = ops.sum(y_true * y_pred)
        soft_dice = (2 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
        return bce + dice_weight * (1.0 - soft_dice)

    return loss


def _loss_np(y_true, y_pred, foreground_weight: float, dice_weight: float) -> float:
    """The training loss evaluated in numpy (validation)."""
    p = np.clip(y_pred.astype(np.float64), 1e-6, 1 - 1e-6)
    w = 1.0 + (foreground_weight - 1.0) * y_true
    bce = -np.mean(w * (y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))
    soft_dice = (2 * np.sum(y_true * y_pred) + 1.0) / (np.sum(y_true) + np.sum(y_pred) + 1.0)
    return float(bce + dice_weight * (1.0 - soft_dice))


def _dice_np(y_true, y_pred) -> float:
    a, b = y_true > 0.5, y_pred > 0.5
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def train_model(train_volumes: Sequence[TrainingVolume], val_volumes: Sequence[TrainingVolume] | None = None,
                *, model=None, params: TrainingParams | None = None, out_stem: str | Path | None = None,
                card_updates: dict | None = None, progress: ProgressCallback = None):
    """Train (or fine-tune) a U-Net.

    Parameters
    ----------
    train_volumes, val_volumes : sequences of TrainingVolume
        Prepared with :func:`volume_pair` / :func:`simulated_training_data` for the model's
        voxel size. Without ``val_volumes``, validation patches come from the training
        volumes (not independent: pass held-out volumes for an honest Dice).
    model : UNetModel, optional
        Weights to start from (fine-tuning). Default: a freshly initialised network.
    params : TrainingParams
    out_stem : path, optional
        Where to save the best weights (``<stem>.weights.h5`` + ``<stem>.json`` card) and
        ``<stem>_history.json`` / ``<stem>_history.png``.
    card_updates : dict, optional
        Fields to record in the model card (e.g. training data description).
    progress : callable, optional
        ``progress("train", step, total_steps)``; raise :class:`cryoves.Cancelled` to stop
        (the best weights so far are kept in ``out_stem``).

    Returns
    -------
    model : UNetModel with the best weights
    history : TrainingHistory
    """
    from cryoves._tf import import_keras
    from cryoves.model import new_model

    keras = import_keras()
    params = params or TrainingParams()
    rng = np.random.default_rng(params.seed)
    keras.utils.set_random_seed(params.seed)
    if model is None:
        model = new_model(name="cryoves", seed=params.seed)
    net = model.keras_model
    sampler = PatchSampler(train_volumes, params, rng)
    val_sampler = PatchSampler(val_volumes or train_volumes, params, np.random.default_rng(params.seed + 1))
    vx, vy = val_sampler.batch(params.n_validation_patches, augment=False)

    net.compile(optimizer=keras.optimizers.Adam(params.learning_rate),
                loss=_loss_fn(keras, params.foreground_weight, params.dice_weight))
    history = TrainingHistory()
    best_weights = None
    total = params.epochs * params.steps_per_epoch
    t0 = time.perf_counter()
    step = 0
    for epoch in range(params.epochs):
        losses = []
        for _ in range(params.steps_per_epoch):
            x, y = sampler.batch()
            losses.append(float(net.train_on_batch(x, y)))
            step += 1
            report(progress, "train", step, total)
        pv = np.concatenate([np.asarray(net.predict_on_batch(vx[i:i + params.batch_size]))
                             for i in range(0, len(vx), params.batch_size)])
        vloss = _loss_np(vy, pv, params.foreground_weight, params.dice_weight)
        vdice = _dice_np(vy, pv)
        history.loss.append(float(np.mean(losses)))
        history.val_loss.append(vloss)
        history.val_dice.append(vdice)
        if not (vdice <= history.best_val_dice):  # also true for the first epoch (nan)
            history.best_val_dice = vdice
            history.best_epoch = epoch
            best_weights = [w.copy() for w in net.get_weights()]
            if out_stem is not None:
                _save(model, out_stem, history, params, card_updates, t0)
    if best_weights is not None:
        net.set_weights(best_weights)
    history.seconds = time.perf_counter() - t0
    if out_stem is not None:
        _save(model, out_stem, history, params, card_updates, t0)
        plot_history(history, Path(str(out_stem) + "_history.png"))
    return model, history


def _save(model, out_stem, history, params, card_updates, t0):
    from cryoves._tf import compute_device

    history.seconds = time.perf_counter() - t0
    card = model.card
    for k, v in (card_updates or {}).items():
        if not hasattr(card, k):
            raise ValueError(f"the model card has no field {k!r}")
        setattr(card, k, v)
    card.metrics = {**card.metrics, "val_dice": round(history.best_val_dice, 4),
                    "best_epoch": history.best_epoch + 1, "epochs_run": len(history.val_dice)}
    card.notes = ("trained by cryoves.train: " + json.dumps({**asdict(params), "seconds": round(history.seconds),
                                                     "device": compute_device()})
                  + ("; " + card.notes if card.notes and not card.notes.startswith("trained by") else ""))
    model.save(out_stem)
    from cryoves.io import atomic_write_text

    atomic_write_text(Path(str(out_stem) + "_history.json"), json.dumps(history.as_dict(), indent=1),
                      overwrite=True)


def plot_history(history: TrainingHistory, path: Path) -> None:
    """Loss and validation Dice per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = np.arange(1, len(history.loss) + 1)
    ax[0].plot(ep, history.loss, "-o", ms=3)
    ax[0].set(xlabel="epoch", ylabel="training loss", title="loss (weighted BCE + Dice)")
    ax[1].plot(ep, history.val_dice, "-o", ms=3, color="C2")
    if history.best_epoch >= 0:
        ax[1].axvline(history.best_epoch + 1, color="0.6", ls="--", lw=1)
    ax[1].set(xlabel="epoch", ylabel="validation Dice", title=f"best Dice {history.best_val_dice:.3f}",
              ylim=(0, 1))
    fig.tight_layout()
    from cryoves.io import atomic_path

    try:
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
