"""The 3-D U-Net of CryoVesNet, its model card, and loading/saving of weights.

The network (:func:`build_unet`) is the CARE/CSBDeep U-Net that CryoVesNet uses: depth 2,
two 3x3x3 convolutions per level with 16/32/64 filters, batch normalisation and ReLU,
max-pooling by 2, nearest upsampling with skip concatenation, and a final 1x1x1
convolution with a sigmoid (about 250k parameters). It is fully convolutional: its input
shape is ``(None, None, None, 1)``, so any tile whose sides are multiples of
``2 ** n_depth`` can be predicted.

Weights are stored in our format as two files side by side::

    NAME.weights.h5   Keras 3 weights (``keras.Model.save_weights``)
    NAME.json         the model card (:class:`ModelCard`): architecture, training voxel size,
                      preprocessing (smoothing, normalisation, contrast), provenance, metrics

The reference CryoVesNet weights (a Keras 2.9 full model saved as HDF5) are read by
:func:`load_reference_weights`, which rebuilds the identical architecture and copies every
weight layer by layer; :func:`load_model` recognises such a file by itself.

One resolver finds the weights a path (or ``None``, the default) stands for
(:func:`resolve_weights`); :func:`describe_weights` reports what they are without building the
network (no TensorFlow import); :func:`get_model` loads them once and caches the model for
every caller (thread-safe).

TensorFlow/Keras are imported lazily through :mod:`cryoves._tf`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import datetime as _dt
import json
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = [
    "ModelCard",
    "UNetModel",
    "build_unet",
    "load_model",
    "load_reference_weights",
    "default_weights_path",
    "resolve_weights",
    "describe_weights",
    "get_model",
    "PREPROCESSING_KEYS",
    "receptive_field",
    "new_model",
    "inference_precision",
    "REFERENCE_LICENSE",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Licence of the reference CryoVesNet weights (they are never shipped with cryoves).
REFERENCE_LICENSE = "GPL-3.0"

_ARCH_DEFAULTS = {
    "n_depth": 2,
    "n_filter_base": 16,
    "kernel_size": 3,
    "n_conv_per_depth": 2,
    "batch_norm": True,
    "dropout": 0.0,
    "last_activation": "sigmoid",
}
_NORM_METHODS = ("percentile", "zscore")
_WEIGHTS_SUFFIX = ".weights.h5"
#: The card fields that say how a tomogram is prepared for the network (after resampling to
#: ``voxel_size_nm``); :meth:`ModelCard.with_preprocessing` and the ``preprocessing=``
#: argument of :func:`cryoves.predict.predict_probability` override them.
PREPROCESSING_KEYS = ("smooth_sigma", "normalization", "invert")


# --------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """Everything needed to use a set of U-Net weights correctly.

    Parameters
    ----------
    name : str
        Short name of the model (e.g. ``"cryoves-sim-v1"``).
    architecture : dict
        Keyword arguments of :func:`build_unet` (``n_depth``, ``n_filter_base``,
        ``kernel_size``, ``n_conv_per_depth``, ``batch_norm``, ``dropout``,
        ``last_activation``). Missing keys take the defaults of :func:`build_unet`.
    voxel_size_nm : float
        Voxel size (nm) of the training data. Tomograms are resampled to it before
        prediction.
    normalization : dict
        How a tomogram is normalised before it enters the network. Either
        ``{"method": "percentile", "p_low": 1.0, "p_high": 99.8}`` (CSBDeep style,
        ``(x - P_low) / (P_high - P_low)``; the percentiles are floats) or
        ``{"method": "zscore"}`` (``(x - mean) / std`` over the whole volume, as the
        reference CryoVesNet code does).
    invert : bool
        True if the training data had inverted contrast (membranes bright); the tomogram
        is then negated before normalisation. cryoves tomograms have dark membranes.
    smooth_sigma : float
        Gaussian smoothing applied after resampling and before normalisation, sigma in
        voxels of ``voxel_size_nm`` (0 = none). The reference CryoVesNet inference uses 1.
        Cards written before this field existed load with 0 (their behaviour is unchanged).
    training_data : str
        Description of the training data.
    metrics : dict
        Validation metrics (e.g. ``{"dice": 0.83}``).
    created : str
        ISO 8601 creation date (UTC).
    cryoves_version : str
        Version of cryoves that wrote the card.
    source : str
        Provenance (who trained it, from what).
    license : str
        Licence of the weights.
    notes : str
        Free text (e.g. preprocessing details).
    """

    name: str
    architecture: dict
    voxel_size_nm: float
    normalization: dict
    invert: bool = False
    smooth_sigma: float = 0.0
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    created: str = ""
    cryoves_version: str = ""
    source: str = ""
    license: str = ""
    notes: str = ""

    _REQUIRED = ("name", "architecture", "voxel_size_nm", "normalization")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the card; raise :class:`ValueError` naming what is wrong.

        Also normalises the fields in place: architecture defaults are filled in,
        percentiles and the voxel size become floats.
        """
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("model card: 'name' must be a non-empty string")
        if not isinstance(self.architecture, dict):
            raise ValueError("model card: 'architecture' must be a dict of build_unet() arguments")
        unknown = set(self.architecture) - set(_ARCH_DEFAULTS)
        if unknown:
            raise ValueError(
                f"model card: unknown architecture keys {sorted(unknown)}; "
                f"allowed: {sorted(_ARCH_DEFAULTS)}")
        arch = dict(_ARCH_DEFAULTS)
        arch.update(self.architecture)
        arch["n_depth"] = int(arch["n_depth"])
        arch["n_filter_base"] = int(arch["n_filter_base"])
        arch["kernel_size"] = int(arch["kernel_size"])
        arch["n_conv_per_depth"] = int(arch["n_conv_per_depth"])
        arch["batch_norm"] = bool(arch["batch_norm"])
        arch["dropout"] = float(arch["dropout"])
        if arch["n_depth"] < 1 or arch["n_filter_base"] < 1 or arch["n_conv_per_depth"] < 1:
            raise ValueError(f"model card: invalid architecture {arch}")
        if arch["kernel_size"] < 1 or arch["kernel_size"] % 2 == 0:
            raise ValueError("model card: 'kernel_size' must be a positive odd integer")
        self.architecture = arch
        try:
            self.voxel_size_nm = float(self.voxel_size_nm)
        except (TypeError, ValueError):
            raise ValueError("model card: 'voxel_size_nm' must be a number (nm)") from None
        if not np.isfinite(self.voxel_size_nm) or self.voxel_size_nm <= 0:
            raise ValueError(
                f"model card: 'voxel_size_nm' must be > 0 nm, got {self.voxel_size_nm}")
        self.normalization = _check_normalization(self.normalization)
        self.invert = _check_invert(self.invert)
        self.smooth_sigma = _check_smooth_sigma(self.smooth_sigma)
        if not isinstance(self.metrics, dict):
            raise ValueError("model card: 'metrics' must be a dict")

    # ------------------------------------------------------------------ preprocessing
    @property
    def preprocessing(self) -> dict:
        """How a tomogram is prepared after resampling to ``voxel_size_nm``.

        ``{"smooth_sigma": float, "normalization": dict, "invert": bool}`` (a copy), applied by
        :func:`cryoves.predict.preprocess` in the order invert, smooth, normalise.
        """
        return {"smooth_sigma": self.smooth_sigma, "normalization": dict(self.normalization),
                "invert": self.invert}

    def with_preprocessing(self, **changes: Any) -> "ModelCard":
        """A copy of the card with some preprocessing fields replaced.

        Parameters
        ----------
        **changes
            Any of :data:`PREPROCESSING_KEYS`: ``smooth_sigma`` (voxels at
            ``voxel_size_nm``), ``normalization`` (dict, as the card field), ``invert``.

        Returns
        -------
        ModelCard
            A new, validated card (this one is unchanged).

        Examples
        --------
        >>> card = ModelCard("m", {}, 2.2, {"method": "zscore"})
        >>> card.with_preprocessing(smooth_sigma=1).smooth_sigma
        1.0
        """
        unknown = sorted(set(changes) - set(PREPROCESSING_KEYS))
        if unknown:
            raise ValueError(
                f"preprocessing: unknown key(s) {unknown}; allowed: {list(PREPROCESSING_KEYS)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        """The card as a JSON-compatible dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """The card as a JSON string (indented, stable key order)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        """Build a card from a dict; raise :class:`ValueError` for missing/invalid keys."""
        if not isinstance(data, dict):
            raise ValueError("model card must be a JSON object")
        missing = [k for k in cls._REQUIRED if k not in data]
        if missing:
            raise ValueError(
                f"model card is missing required key(s) {missing}; a card needs "
                f"{list(cls._REQUIRED)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        kwargs = {k: v for k, v in data.items() if k in names}
        card = cls(**kwargs)
        if unknown:  # keep forward compatibility: unknown keys are ignored, but noted
            card.notes = (card.notes + " " if card.notes else "") + (
                f"(ignored unknown card keys: {unknown})")
        return card

    @classmethod
    def from_json(cls, text_or_path: Union[str, PathLike]) -> "ModelCard":
        """Parse a card from a JSON string or a path to a ``.json`` file."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or (
                isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"model card {str(path)!r} not found")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model card is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _check_normalization(norm) -> dict:
    """Validated copy of a card's ``normalization`` dict (percentiles become floats)."""
    if not isinstance(norm, dict) or "method" not in norm:
        raise ValueError(
            "model card: 'normalization' must be a dict with a 'method' "
            f"({' or '.join(_NORM_METHODS)})")
    if norm["method"] not in _NORM_METHODS:
        raise ValueError(
            f"model card: unknown normalization method {norm['method']!r}; "
            f"use one of {_NORM_METHODS}")
    norm = dict(norm)
    if norm["method"] == "percentile":
        for key in ("p_low", "p_high"):
            if key not in norm:
                raise ValueError(f"model card: percentile normalization needs {key!r}")
            norm[key] = float(norm[key])  # never int: 99.8 must stay 99.8
        if not 0.0 <= norm["p_low"] < norm["p_high"] <= 100.0:
            raise ValueError(
                "model card: need 0 <= p_low < p_high <= 100, got "
                f"{norm['p_low']}, {norm['p_high']}")
    return norm


def _check_invert(value) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer))
                                               and value in (0, 1)):
        return bool(value)
    raise ValueError(f"model card: 'invert' must be true or false, got {value!r}")


def _check_smooth_sigma(value) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"model card: 'smooth_sigma' must be a number of voxels, got {value!r}")
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"model card: 'smooth_sigma' must be a number of voxels, got {value!r}") from None
    if not np.isfinite(sigma) or not 0.0 <= sigma <= 10.0:
        raise ValueError(
            f"model card: 'smooth_sigma' must be between 0 (no smoothing) and 10 voxels, "
            f"got {value!r}")
    return sigma


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _version() -> str:
    from cryoves import __version__

    return __version__


# --------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------
def build_unet(n_depth: int = 2, n_filter_base: int = 16, kernel_size: int = 3,
               batch_norm: bool = True, dropout: float = 0.0,
               last_activation: str = "sigmoid", n_conv_per_depth: int = 2, dtype: Optional[str] = None):
    """Build the CryoVesNet 3-D U-Net from CSBDeep blocks (Keras 3).

    Parameters
    ----------
    n_depth : int
        Number of down-sampling levels (2: 16/32/64 filters).
    n_filter_base : int
        Filters at the top level; doubled at every level.
    kernel_size : int
        Side of the cubic convolution kernels (odd).
    batch_norm : bool
        Batch normalisation after every 3x3x3 convolution (before the ReLU).
    dropout : float
        Dropout rate after every convolution block (only active in training; the
        reference weights were trained with 0.2).
    last_activation : str
        Activation of the final 1x1x1 convolution (``"sigmoid"`` for a probability).
    n_conv_per_depth : int
        Convolutions per level.
    dtype : str, optional
        Keras dtype policy of every layer but the final 1x1x1 convolution and its activation,
        which compute in float32 (``"mixed_bfloat16"``: float32 weights, bfloat16 arithmetic).
        Given, the same network is built from plain Keras layers (csbdeep's builder takes no
        dtype). None: csbdeep's build, the global policy.

    Returns
    -------
    keras.Model
        Input ``(None, None, None, 1)``: tiles of any size divisible by ``2**n_depth``.
    """
    from cryoves._tf import import_keras

    keras = import_keras()  # safe TensorFlow import before csbdeep imports it
    k = int(kernel_size)
    if keras.backend.backend() != "tensorflow" or dtype is not None:
        # csbdeep imports TensorFlow; on another backend (torch on a GPU machine without
        # TensorFlow), or for another dtype policy, build the identical graph from plain Keras layers
        return _build_unet_plain_keras(keras, int(n_depth), int(n_filter_base), k, bool(batch_norm),
                                       float(dropout), last_activation, int(n_conv_per_depth), dtype=dtype)
    from csbdeep.internals.nets import custom_unet

    return custom_unet((None, None, None, 1), last_activation, n_depth=int(n_depth),
                       n_filter_base=int(n_filter_base), kernel_size=(k, k, k),
                       n_conv_per_depth=int(n_conv_per_depth), activation="relu",
                       batch_norm=bool(batch_norm), dropout=float(dropout),
                       pool_size=(2, 2, 2), n_channel_out=1)


def _build_unet_plain_keras(keras, n_depth, n_filter_base, k, batch_norm, dropout, last_activation,
                            n_conv_per_depth, dtype=None):
    """The same network as csbdeep's ``custom_unet`` (same layers, order and shapes), in plain Keras.

    Mirrors ``csbdeep.internals.blocks.unet_block`` / ``conv_block3`` and
    ``csbdeep.internals.nets.custom_unet`` (csbdeep 0.8), so weights saved from either build
    load into the other. ``dtype``: the Keras dtype policy of every layer but the final
    1x1x1 convolution and its activation, which compute in float32 (e.g. ``"mixed_bfloat16"``:
    float32 weights, bfloat16 arithmetic); None = the global policy.
    """
    L = keras.layers
    if dtype is not None:
        L = type("Layers", (), {name: functools.partial(getattr(keras.layers, name), dtype=dtype) for name in
                                ("Conv3D", "BatchNormalization", "Activation", "Dropout", "MaxPooling3D",
                                 "Concatenate", "UpSampling3D")})

    def conv_block(x, n_filter, name):
        if batch_norm:
            x = L.Conv3D(n_filter, (k, k, k), padding="same", kernel_initializer="glorot_uniform", name=name)(x)
            x = L.BatchNormalization()(x)
            x = L.Activation("relu")(x)
        else:
            x = L.Conv3D(n_filter, (k, k, k), padding="same", kernel_initializer="glorot_uniform",
                         activation="relu", name=name)(x)
        if dropout > 0:
            x = L.Dropout(dropout)(x)
        return x

    inp = keras.Input((None, None, None, 1), name="input")
    skips, x = [], inp
    for n in range(n_depth):
        for i in range(n_conv_per_depth):
            x = conv_block(x, n_filter_base * 2 ** n, f"down_level_{n}_no_{i}")
        skips.append(x)
        x = L.MaxPooling3D((2, 2, 2), name=f"max_{n}")(x)
    for i in range(n_conv_per_depth - 1):
        x = conv_block(x, n_filter_base * 2 ** n_depth, f"middle_{i}")
    x = conv_block(x, n_filter_base * 2 ** max(0, n_depth - 1), f"middle_{n_conv_per_depth}")
    for n in reversed(range(n_depth)):
        x = L.Concatenate(axis=-1)([L.UpSampling3D((2, 2, 2))(x), skips[n]])
        for i in range(n_conv_per_depth - 1):
            x = conv_block(x, n_filter_base * 2 ** n, f"up_level_{n}_no_{i}")
        x = conv_block(x, n_filter_base * 2 ** max(0, n - 1), f"up_level_{n}_no_{n_conv_per_depth}")
    final = {} if dtype is None else {"dtype": "float32"}
    x = keras.layers.Conv3D(1, (1, 1, 1), activation="linear", **final)(x)
    out = keras.layers.Activation(last_activation, **final)(x)
    return keras.Model(inputs=inp, outputs=out)


def receptive_field(n_depth: int = 2, kernel_size: int = 3, n_conv_per_depth: int = 2):
    """Exact receptive field of :func:`build_unet` along one axis.

    Propagates index intervals backwards through every convolution, pooling, upsampling
    and skip connection, for each alignment of the output voxel on the pooling grid.

    Parameters
    ----------
    n_depth, kernel_size, n_conv_per_depth : int
        Architecture (as :func:`build_unet`).

    Returns
    -------
    width : int
        Number of input voxels (along one axis) that can influence one output voxel.
    radius : int
        The largest distance from an output voxel to an input voxel that influences it;
        a tile halo of at least ``radius`` voxels makes tiled prediction exact (when tiles
        start on the ``2**n_depth`` pooling grid). For the default net: width 44, radius 23.
    """
    r = int(kernel_size) // 2
    c = int(n_conv_per_depth) * r

    def enc(level, lo, hi):  # encoder output (skip) range at `level` -> input range
        lo, hi = lo - c, hi + c
        return (lo, hi) if level == 0 else enc(level - 1, 2 * lo, 2 * hi + 1)

    def bottom(lo, hi):  # bottleneck output range -> input range
        return enc(n_depth - 1, 2 * (lo - c), 2 * (hi + c) + 1)

    def dec(level, lo, hi):  # decoder output range at `level` -> input range
        lo, hi = lo - c, hi + c
        a = enc(level, lo, hi)
        b = bottom(lo // 2, hi // 2) if level + 1 == n_depth else dec(level + 1, lo // 2, hi // 2)
        return min(a[0], b[0]), max(a[1], b[1])

    width = radius = 0
    for x in range(2 ** int(n_depth)):
        lo, hi = dec(0, x, x)
        width = max(width, hi - lo + 1)
        radius = max(radius, x - lo, hi - x)
    return width, radius


# --------------------------------------------------------------------------------------
# The model object
# --------------------------------------------------------------------------------------
class UNetModel:
    """A Keras U-Net together with its :class:`ModelCard`.

    Parameters
    ----------
    keras_model : keras.Model
        The network (as built by :func:`build_unet` with ``card.architecture``).
    card : ModelCard
        How to use it (voxel size, normalisation, contrast).
    path : str or Path, optional
        Where it was loaded from (informational).

    Attributes
    ----------
    keras_model, card, path
    """

    def __init__(self, keras_model, card: ModelCard, path: Optional[PathLike] = None):
        if not isinstance(card, ModelCard):
            raise TypeError("card must be a cryoves.model.ModelCard")
        self.keras_model = keras_model
        self.card = card
        self.path = None if path is None else Path(path)
        self._inference = None
        self._predictor = None

    def __repr__(self) -> str:
        return (f"UNetModel(name={self.card.name!r}, voxel_size_nm={self.card.voxel_size_nm}, "
                f"normalization={self.card.normalization}, params={self.count_params()})")

    @property
    def voxel_size_nm(self) -> float:
        """Voxel size (nm) the network was trained at."""
        return self.card.voxel_size_nm

    @property
    def divisor(self) -> int:
        """Tile sides must be multiples of this (``2 ** n_depth``)."""
        return 2 ** int(self.card.architecture["n_depth"])

    @property
    def receptive_field(self):
        """``(width, radius)`` of the receptive field in voxels (see :func:`receptive_field`)."""
        a = self.card.architecture
        return receptive_field(a["n_depth"], a["kernel_size"], a["n_conv_per_depth"])

    def count_params(self) -> int:
        """Number of weights of the network."""
        return int(self.keras_model.count_params())

    # ------------------------------------------------------------------ inference
    def inference_model(self, precision: Optional[str] = None):
        """The network with batch normalisation folded into the convolutions.

        For prediction only: every ``Conv3D -> BatchNormalization -> ReLU`` becomes one
        ``Conv3D`` with ReLU (``w' = w * g / sqrt(v + eps)``,
        ``b' = (b - m) * g / sqrt(v + eps) + beta``), dropout is dropped. It computes the
        same function as :attr:`keras_model` in inference mode (to float rounding) with
        about half the memory and fewer passes over it. Cached, and rebuilt automatically
        when the weights of :attr:`keras_model` change (e.g. after training): the cache is
        keyed by a hash of all weights (~1 ms) and the precision.

        ``precision`` (``"float32"`` or ``"bfloat16"``; None = :func:`inference_precision`) is
        the arithmetic of the hidden layers; the weights stay float32 and the final 1x1x1
        convolution and sigmoid compute in float32 either way.
        """
        precision = inference_precision() if precision is None else _check_precision(precision)
        key = (self._weights_fingerprint(), precision)
        if self._inference is None or self._inference[0] != key:
            self._inference = (key, _fold_batchnorm(self.keras_model, self.card.architecture, precision))
        return self._inference[1]

    def predictor(self, precision: Optional[str] = None):
        """What :func:`cryoves.predict.predict_probability` runs tiles through: ``predict_on_batch(x)``.

        In float32, or for an architecture it does not cover, :meth:`inference_model` itself. In
        bfloat16 (TensorFlow, a CPU that computes it natively) a :class:`_Bf16Forward` of the same
        folded weights: the same layers, except that each convolution after a skip connection is
        computed as two (``conv(concat(u, s), k) == conv(u, k_u) + conv(s, k_s)``, the second added
        in the first one's fused epilogue) instead of on a concatenated tensor, and the final 1x1x1
        convolution and sigmoid run in float32 on a few slabs at a time. It needs about half the
        memory per voxel (measured 107 instead of 208 bytes on a 160x220x220 tile) and computes the
        same map up to bfloat16 rounding (the skip half of the sum is rounded to bfloat16 once).
        Cached with :meth:`inference_model`.
        """
        precision = inference_precision() if precision is None else _check_precision(precision)
        net = self.inference_model(precision)
        if precision != "bfloat16" or not _Bf16Forward.supports(self.card.architecture):
            return net
        if getattr(self, "_predictor", None) is None or self._predictor[0] is not net:
            self._predictor = (net, _Bf16Forward(net, self.card.architecture))
        return self._predictor[1]

    def invalidate_inference_model(self) -> None:
        """Forget the cached :meth:`inference_model` (it is also rebuilt automatically)."""
        self._inference = None
        self._predictor = None

    def _weights_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for w in self.keras_model.get_weights():
            h.update(np.ascontiguousarray(w).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ saving
    def save(self, path_stem: PathLike) -> Path:
        """Write ``STEM.weights.h5`` and ``STEM.json`` atomically.

        Each file is written to a temporary name in the same folder and moved into place
        with :func:`os.replace`, so a crash never leaves a half-written file.

        Parameters
        ----------
        path_stem : str or Path
            Path without suffix (``weights/cryoves-sim``); a trailing ``.weights.h5`` or
            ``.json`` is stripped.

        Returns
        -------
        Path
            The ``.weights.h5`` file written.
        """
        stem = _stem(Path(path_stem))
        stem.parent.mkdir(parents=True, exist_ok=True)
        weights_path = stem.parent / (stem.name + _WEIGHTS_SUFFIX)
        card_path = stem.parent / (stem.name + ".json")
        fd, tmp = tempfile.mkstemp(prefix=f".{stem.name}.", suffix=_WEIGHTS_SUFFIX,
                                   dir=stem.parent)
        os.close(fd)
        try:
            os.remove(tmp)  # keras refuses to overwrite silently in some versions
            self.keras_model.save_weights(tmp)
            os.replace(tmp, weights_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        from cryoves.io import atomic_write_text

        atomic_write_text(card_path, self.card.to_json(), overwrite=True)
        self.path = weights_path
        return weights_path


def _stem(p: Path) -> Path:
    name = p.name
    for suffix in (_WEIGHTS_SUFFIX, ".json", ".h5"):
        if name.endswith(suffix):
            return p.parent / name[: -len(suffix)]
    return p


PRECISIONS = ("float32", "bfloat16")


def _check_precision(value) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    """bfloat16 is native here: TensorFlow on a CPU with AVX512-BF16 or AMX-BF16, no GPU."""
    from cryoves._tf import compute_device, import_keras

    if import_keras().backend.backend() != "tensorflow" or not compute_device().startswith("CPU"):
        return False
    return _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    """The CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def inference_precision() -> str:
    """The arithmetic of the U-Net's hidden layers at prediction: ``"bfloat16"`` or ``"float32"``.

    The environment variable ``CRYOVES_PRECISION`` (``float32``, ``bfloat16`` or ``auto``) chooses;
    ``auto`` (the default) takes bfloat16 on a CPU that computes it natively (AVX512-BF16 or
    AMX-BF16) when TensorFlow sees no GPU, and float32 everywhere else (emulated bfloat16 is
    slower). bfloat16 keeps float32's range with an 8-bit mantissa: measured on this project's
    2-core AVX512-BF16 machine on a simulated 96x224x224 tomogram, a prediction took 2.3-2.4 CPU
    seconds instead of 4.5 and the probability maps differed from float32 by at most 0.037 (mean
    5e-5); docs/models.md and docs/accuracy.md. Weights stay float32; the final convolution and
    sigmoid compute in float32.
    """
    value = os.environ.get("CRYOVES_PRECISION", "auto").strip().lower() or "auto"
    if value == "auto":
        return "bfloat16" if _native_bf16() else "float32"
    if value not in PRECISIONS:
        raise ValueError(f"CRYOVES_PRECISION must be auto, float32 or bfloat16, got {value!r}")
    return value


def _layers_of(model, class_name: str):
    return [layer for layer in model.layers if type(layer).__name__ == class_name]


class _Bf16Forward:
    """The folded U-Net (:func:`_fold_batchnorm`, bfloat16) as one ``tf.function`` with a fixed input
    signature (any tile shape, one trace), in less memory than the Keras graph.

    Two changes to the Keras graph, both for memory: (1) the first convolution after each skip
    connection is ``relu(conv(u, k_u) + b + conv(s, k_s))`` on the upsampled tensor ``u`` and the
    skip ``s`` instead of ``relu(conv(concat(u, s), k) + b)`` (no concatenated tensor; the sum is the
    same up to the bfloat16 rounding of ``conv(s, k_s)``); (2) the final float32 1x1x1 convolution and
    its activation run on :attr:`N_FINAL_SLABS` slabs along Z one after the other (the float32 copy of
    the last hidden layer is a quarter of the tile at a time; the same numbers as on the whole tile).
    Every other operation is the Keras graph's (bfloat16 convolutions with bias and ReLU, max
    pooling, nearest upsampling), weights cast to bfloat16 once instead of at every call.
    """

    N_FINAL_SLABS = 4

    @staticmethod
    def supports(architecture: dict) -> bool:
        a = architecture
        return (a.get("last_activation") in ("sigmoid", "linear") and int(a.get("n_depth", 0)) >= 1
                and int(a.get("n_conv_per_depth", 0)) >= 1)

    def __init__(self, folded, architecture: dict):
        from cryoves._tf import import_tensorflow

        tf = import_tensorflow()
        nd, nc = int(architecture["n_depth"]), int(architecture["n_conv_per_depth"])
        last_activation = architecture["last_activation"]
        convs = _layers_of(folded, "Conv3D")
        if len(convs) != 2 * nd * nc + nc + 1:  # pragma: no cover - guaranteed by build_unet
            raise RuntimeError("unexpected U-Net structure")
        params = [[np.asarray(w, dtype=np.float32) for w in c.get_weights()] for c in convs]
        bf = tf.bfloat16
        hidden = [(tf.constant(k, dtype=bf), tf.constant(b, dtype=bf)) for k, b in params[:-1]]
        k_last, b_last = (tf.constant(a) for a in params[-1])
        n_slabs = self.N_FINAL_SLABS
        ones = [1, 1, 1, 1, 1]

        def conv(x, i):
            k, b = hidden[i]
            return tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, k, ones, "SAME"), b))

        def up2(x):  # nearest upsampling by 2 along Z, Y, X (as keras' UpSampling3D: copies)
            s = tf.shape(x)
            c = x.shape[-1]
            bz = s[0] * s[1]
            y = tf.broadcast_to(tf.reshape(x, [bz, s[2], 1, s[3], 1, c]), [bz, s[2], 2, s[3], 2, c])
            y = tf.broadcast_to(tf.reshape(y, [bz, 1, 4 * s[2] * s[3] * c]), [bz, 2, 4 * s[2] * s[3] * c])
            return tf.reshape(y, [s[0], 2 * s[1], 2 * s[2], 2 * s[3], c])

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)])
        def forward(x):
            x = tf.cast(x, bf)
            i, skips = 0, []
            for _ in range(nd):
                for _ in range(nc):
                    x, i = conv(x, i), i + 1
                skips.append(x)
                x = tf.nn.max_pool3d(x, 2, 2, "VALID")
            for _ in range(nc):
                x, i = conv(x, i), i + 1
            for n in reversed(range(nd)):
                k, b = hidden[i]
                cu = x.shape[-1]
                t = tf.nn.conv3d(skips[n], k[:, :, :, cu:, :], ones, "SAME")
                x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(up2(x), k[:, :, :, :cu, :], ones, "SAME"), b) + t)
                i += 1
                for _ in range(nc - 1):
                    x, i = conv(x, i), i + 1
            def final(part):
                y = tf.nn.bias_add(tf.nn.conv3d(tf.cast(part, tf.float32), k_last, ones, "SAME"), b_last)
                return tf.sigmoid(y) if last_activation == "sigmoid" else y

            def in_slabs():
                z = tf.shape(x)[1]
                q = z // n_slabs
                parts = tf.split(x, [q] * (n_slabs - 1) + [z - (n_slabs - 1) * q], num=n_slabs, axis=1)
                outs = []
                for part in parts:  # one slab after the other: a part of the float32 copy at a time
                    with tf.control_dependencies(outs[-1:]):
                        part = tf.identity(part)
                    outs.append(final(part))
                return tf.concat(outs, axis=1)

            return tf.cond(tf.shape(x)[1] >= n_slabs, in_slabs, lambda: final(x))

        self._forward = forward

    def predict_on_batch(self, x) -> np.ndarray:
        """The network's output for a batch ``(n, Z, Y, X, 1)`` (float32 numpy array)."""
        return self._forward(np.asarray(x, dtype=np.float32)).numpy()


def _fold_batchnorm(keras_model, architecture: dict, precision: str = "float32"):
    """Build the BN-folded, dropout-free twin of ``keras_model`` (see ``inference_model``)."""
    arch = dict(architecture)
    folded = build_unet(**{**arch, "batch_norm": False, "dropout": 0.0},
                        dtype=None if precision == "float32" else "mixed_" + precision)
    if not arch.get("batch_norm", True):
        folded.set_weights(keras_model.get_weights())
        return folded
    src_convs = _layers_of(keras_model, "Conv3D")
    src_bns = _layers_of(keras_model, "BatchNormalization")
    dst_convs = _layers_of(folded, "Conv3D")
    if len(src_convs) != len(dst_convs) or len(src_bns) != len(src_convs) - 1:
        raise RuntimeError("unexpected U-Net structure: cannot fold batch normalisation")
    for i, (src, dst) in enumerate(zip(src_convs, dst_convs)):
        w, b = (np.asarray(a, dtype=np.float64) for a in src.get_weights())
        if i < len(src_bns):  # every conv but the final 1x1x1 one is followed by BN
            bn = src_bns[i]
            gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in bn.get_weights())
            scale = gamma / np.sqrt(var + float(bn.epsilon))
            w = w * scale
            b = (b - mean) * scale + beta
        dst.set_weights([w.astype(np.float32), b.astype(np.float32)])
    return folded


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def default_weights_path() -> Path:
    """The default shipped weights: the first ``*.weights.h5`` with a card in ``weights_dir()``.

    Raises
    ------
    FileNotFoundError
        If no trained default ships with this installation.
    """
    from cryoves._resources import weights_dir

    try:
        folder = weights_dir()
    except FileNotFoundError:
        folder = None
    if folder is not None:
        found = _weights_with_card(folder)
        if found:
            return found[0]
    raise FileNotFoundError(
        "no default U-Net weights ship with this installation of cryoves yet "
        f"(looked for NAME.weights.h5 + NAME.json in {folder}). Pass weights explicitly: "
        "load_model('path/to/NAME.weights.h5') for cryoves weights, or the reference "
        "CryoVesNet weights file: load_model('path/to/cryovesnet/weights/weights.h5').")


def _weights_with_card(folder: Path):
    out = []
    for p in sorted(Path(folder).glob("*" + _WEIGHTS_SUFFIX)):
        if (p.parent / (p.name[: -len(_WEIGHTS_SUFFIX)] + ".json")).is_file():
            out.append(p)
    return out


def _is_reference_file(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return _is_reference_h5(fh)
    except OSError:
        return False


def _is_reference_h5(fh) -> bool:
    return "model_config" in fh.attrs and "model_weights" in fh


def _open_h5(path: Path):
    """Open an HDF5 file for reading; a damaged or non-HDF5 file raises one clear line."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = str(err)
        inner = re.findall(r"\(([^()]*)\)", reason)
        reason = inner[-1] if inner else reason.splitlines()[0] if reason else type(err).__name__
        raise ValueError(
            f"{path} is not a valid HDF5 weights file (truncated, damaged or another format: "
            f"{reason})") from None


def _card_path_of(weights: Path) -> Optional[Path]:
    if weights.name.endswith(_WEIGHTS_SUFFIX):
        return weights.parent / (weights.name[: -len(_WEIGHTS_SUFFIX)] + ".json")
    return None


def resolve_weights(path: Optional[PathLike] = None) -> Path:
    """The weights file that ``path`` stands for: the one resolver of cryoves.

    Parameters
    ----------
    path : str or Path, optional
        ``None``: the default weights shipped with cryoves (:func:`default_weights_path`).
        A ``NAME.weights.h5`` (or its ``NAME.json`` card), a reference CryoVesNet
        ``weights.h5``, or a folder: its first ``NAME.weights.h5`` with a card, else its first
        reference weights file.

    Returns
    -------
    Path
        Absolute path of the weights file (symbolic links resolved). Its content is not
        checked here (:func:`describe_weights` and :func:`load_model` do that).

    Raises
    ------
    FileNotFoundError
        If nothing usable is found.
    """
    if path is None:
        return default_weights_path().resolve()
    path = Path(path).expanduser()
    if path.is_dir():
        found = _weights_with_card(path)
        if found:
            return found[0].resolve()
        refs = [p for p in sorted(path.glob("*.h5")) if _is_reference_file(p)]
        if not refs:
            raise FileNotFoundError(
                f"no NAME.weights.h5 with a NAME.json card, and no reference CryoVesNet "
                f"weights.h5, in folder {str(path)!r}")
        return refs[0].resolve()
    if path.suffix == ".json":
        sibling = path.parent / (path.name[:-5] + _WEIGHTS_SUFFIX)
        if sibling.is_file():
            return sibling.resolve()
        if path.is_file():
            raise FileNotFoundError(
                f"weights file {str(sibling)!r} of the model card {path.name} not found")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    return path.resolve()


def _weights_kind(path: Path):
    """``("cryoves", card_path)`` or ``("reference", None)`` for a resolved weights file."""
    card_path = _card_path_of(path)
    with _open_h5(path) as fh:  # a damaged file is reported as such, whatever its name
        is_ref = _is_reference_h5(fh)
    if card_path is not None and card_path.is_file():
        return "cryoves", card_path
    if is_ref:
        return "reference", None
    if card_path is not None:
        raise FileNotFoundError(
            f"model card {str(card_path)!r} not found next to {path.name}; cryoves weights "
            "need their NAME.json card (architecture, voxel size, preprocessing)")
    raise ValueError(
        f"{str(path)!r} is neither cryoves weights (NAME.weights.h5 + NAME.json) nor a "
        "reference CryoVesNet Keras model (HDF5 with a model_config attribute)")


def _read_card(card_path: Path) -> ModelCard:
    try:
        return ModelCard.from_json(card_path)
    except ValueError as err:
        raise ValueError(f"{card_path}: {err}") from None


def _snake(class_name: str) -> str:
    """Keras' ``to_snake_case`` (the names its weights files give layers)."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()


def _file_layer_shapes(fh) -> Optional[dict]:
    """``{layer base name: [[shape of each var], ...] in order}`` of a Keras 3 weights file."""
    if "layers" not in fh:
        return None
    out: dict = {}
    for name, group in fh["layers"].items():
        m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
        base, idx = m.group(1), int(m.group(2) or 0)
        vars_ = group.get("vars")
        shapes = ([tuple(vars_[k].shape) for k in sorted(vars_, key=int)]
                  if vars_ is not None else [])
        if shapes:
            out.setdefault(base, []).append((idx, shapes))
    return {base: [s for _, s in sorted(v)] for base, v in out.items()}


def _layout_difference(fh, keras_model) -> Optional[str]:
    """What differs between a Keras 3 weights file and ``keras_model`` (None: nothing)."""
    in_file = _file_layer_shapes(fh)
    if in_file is None:
        return "the file has no Keras 3 'layers' group (it was not written by UNetModel.save)"
    expected: dict = {}
    names: dict = {}
    for layer in keras_model.layers:
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes:
            base = _snake(type(layer).__name__)
            expected.setdefault(base, []).append(shapes)
            names.setdefault(base, []).append(layer.name)
    for base in list(expected) + sorted(set(in_file) - set(expected)):  # network order first
        got, want = in_file.get(base, []), expected.get(base, [])
        if len(got) != len(want):
            return (f"the file has {len(got)} {base} layer(s) with weights, the card's network "
                    f"{len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                return (f"{base} layer #{i} ({names[base][i]}): weight shapes {g} in the file, "
                        f"{w} for the card's architecture")
    return None


def _count_file_params(fh) -> Optional[int]:
    """Number of network weights stored in a cryoves or reference weights file."""
    import h5py

    group = fh["layers"] if "layers" in fh else fh["model_weights"] if "model_weights" in fh \
        else None
    if group is None:
        return None
    total = 0

    def add(_name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset):
            total += int(obj.size)

    group.visititems(add)
    return total


def load_model(path: Optional[PathLike] = None) -> UNetModel:
    """Load a U-Net with its model card.

    Each call builds a new network; :func:`get_model` returns a cached one.

    Parameters
    ----------
    path : str or Path, optional
        ``None``: the default weights shipped with cryoves (:func:`default_weights_path`).
        A ``NAME.weights.h5`` file written by :meth:`UNetModel.save` (its ``NAME.json`` card
        must lie next to it), a folder holding one, or a reference CryoVesNet weights file
        (Keras 2 full model in HDF5, recognised by its ``model_config`` attribute; see
        :func:`load_reference_weights`). Resolved by :func:`resolve_weights`.

    Returns
    -------
    UNetModel

    Raises
    ------
    FileNotFoundError
        If the path or the card next to it does not exist, or no default weights ship.
    ValueError
        If the file is not valid HDF5, is neither cryoves weights nor a reference CryoVesNet
        model, its card is invalid, or its weights do not fit the architecture in its card
        (one line naming the file and the first difference).
    """
    path = resolve_weights(path)
    kind, card_path = _weights_kind(path)
    if kind == "reference":
        return load_reference_weights(path)
    card = _read_card(card_path)
    keras_model = build_unet(**card.architecture)
    arch = ", ".join(f"{k}={v}" for k, v in card.architecture.items())

    def misfit(detail: str) -> ValueError:
        return ValueError(f"weights in {path} do not fit the architecture in its card {card_path.name} "
                          f"({arch}): {detail}")

    with _open_h5(path) as fh:
        diff = _layout_difference(fh, keras_model)
    if diff is not None:
        raise misfit(diff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            keras_model.load_weights(str(path))
        except Exception as err:  # keras raises ValueError/KeyError on mismatch
            raise misfit((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    skipped = [str(w.message) for w in caught
               if "skipping" in str(w.message).lower() or "retain" in str(w.message).lower()]
    if skipped:  # keras would leave some layers randomly initialised: refuse
        raise misfit(skipped[0].strip().splitlines()[0])
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return UNetModel(keras_model, card, path)


def describe_weights(path: Optional[PathLike] = None) -> dict:
    """What a weights file is, read from its card or header without building the network.

    Imports neither TensorFlow nor Keras (only :mod:`h5py`), so it is cheap enough for a
    user interface to call whenever a weights path changes.

    Parameters
    ----------
    path : str or Path, optional
        As :func:`load_model` (``None``: the default weights).

    Returns
    -------
    dict
        ``name`` (str), ``path`` (str, the resolved weights file), ``card_path`` (str or
        None for reference weights), ``kind`` (``"cryoves"`` or ``"reference"``),
        ``is_reference`` (bool), ``voxel_size_nm`` (float), ``preprocessing``
        (:attr:`ModelCard.preprocessing`), ``architecture`` (dict), ``n_params`` (int or
        None), ``source``, ``license`` (str), ``summary`` (one line for display).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`load_model` (missing file or card, damaged file, invalid card).
    """
    resolved = resolve_weights(path)
    kind, card_path = _weights_kind(resolved)
    with _open_h5(resolved) as fh:
        if kind == "reference":
            card = _reference_card(resolved, fh)
        else:
            card = _read_card(card_path)
        n_params = _count_file_params(fh)
    prep = card.preprocessing
    norm = prep["normalization"]
    norm_text = ("z-score" if norm["method"] == "zscore"
                 else f"percentiles {norm['p_low']:g}-{norm['p_high']:g}")
    smooth = (f"Gaussian sigma {prep['smooth_sigma']:g} voxel, " if prep["smooth_sigma"] > 0
              else "")
    summary = (f"{card.name} ({'reference CryoVesNet' if kind == 'reference' else 'cryoves'}): "
               f"{card.voxel_size_nm:g} nm voxels, {smooth}{norm_text}"
               f"{', inverted contrast' if prep['invert'] else ''}")
    return {
        "name": card.name,
        "path": str(resolved),
        "card_path": None if card_path is None else str(card_path),
        "kind": kind,
        "is_reference": kind == "reference",
        "voxel_size_nm": card.voxel_size_nm,
        "preprocessing": prep,
        "architecture": dict(card.architecture),
        "n_params": n_params,
        "source": card.source,
        "license": card.license,
        "summary": summary,
    }


_CACHE_LOCK = threading.Lock()
_CACHE: "OrderedDict[tuple, UNetModel]" = OrderedDict()
_CACHE_SIZE = 3


def _cache_key(path: Path) -> tuple:
    card = _card_path_of(path)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if card is not None and card.is_file():
        cst = card.stat()
        key += (cst.st_mtime_ns, cst.st_size)
    return key


def get_model(path: Optional[PathLike] = None) -> UNetModel:
    """The model of a weights path, loaded once and shared (thread-safe cache).

    Repeated calls with a path that resolves to the same unchanged file (and card) return
    the same :class:`UNetModel` object; when the weights file or its card changes on disk
    (modification time or size), it is loaded again. The few most recently used models are
    kept. Treat the returned model as read-only (its card and weights are shared by every
    caller); use :func:`load_model` for a private copy to modify or train.

    Parameters
    ----------
    path : str or Path, optional
        As :func:`load_model` (``None``: the default weights).

    Returns
    -------
    UNetModel
    """
    resolved = resolve_weights(path)
    with _CACHE_LOCK:  # held while loading: a second caller waits for the same model
        key = _cache_key(resolved)
        model = _CACHE.get(key)
        if model is None:
            model = load_model(resolved)
            _CACHE[key] = model
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return model


def _reference_architecture(config: dict) -> dict:
    """Read build_unet() arguments from a Keras 2 model_config of a CryoVesNet U-Net."""
    layers = config["config"]["layers"]
    convs = [lyr["config"] for lyr in layers if lyr["class_name"] == "Conv3D"]
    if not convs:
        raise ValueError("reference model has no Conv3D layer: not a 3-D CryoVesNet U-Net")
    n_pool = sum(1 for lyr in layers if lyr["class_name"] == "MaxPooling3D")
    n_bn = sum(1 for lyr in layers if lyr["class_name"] == "BatchNormalization")
    drop = [lyr["config"]["rate"] for lyr in layers if lyr["class_name"] == "Dropout"]
    down0 = [c for c in convs if c["name"].startswith("down_level_0_")]
    n_conv = len(down0) if down0 else 2
    ks = convs[0]["kernel_size"]
    last = convs[-1]
    last_activation = last.get("activation", "linear")
    if last_activation == "linear":  # csbdeep style: separate Activation layer
        acts = [lyr for lyr in layers if lyr["class_name"] == "Activation"]
        last_activation = acts[-1]["config"]["activation"] if acts else "linear"
    return {
        "n_depth": n_pool,
        "n_filter_base": int(convs[0]["filters"]),
        "kernel_size": int(ks[0]),
        "n_conv_per_depth": n_conv,
        "batch_norm": n_bn > 0,
        "dropout": float(drop[0]) if drop else 0.0,
        "last_activation": last_activation,
    }


def _read_reference_layers(fh):
    """Ordered list of (layer_name, class_name, {weight_suffix: array}) for weighted layers."""
    config = json.loads(_as_str(fh.attrs["model_config"]))
    mw = fh["model_weights"]
    out = []
    for lyr in config["config"]["layers"]:
        name = lyr["config"]["name"]
        if name not in mw:
            continue
        group = mw[name]
        weight_names = [_as_str(w) for w in group.attrs.get("weight_names", [])]
        if not weight_names:
            continue
        arrays = {}
        for wn in weight_names:
            key = wn.split("/")[-1].split(":")[0]
            arrays[key] = np.asarray(group[wn])
        out.append((name, lyr["class_name"], arrays))
    return config, out


def _as_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _reference_card(path: Path, fh) -> ModelCard:
    """The model card of a reference CryoVesNet weights file (read from its HDF5 header)."""
    keras_version = _as_str(fh.attrs.get("keras_version", "unknown"))
    try:
        arch = _reference_architecture(json.loads(_as_str(fh.attrs["model_config"])))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(
            f"{path}: cannot read a CryoVesNet U-Net from its Keras model_config "
            f"({type(err).__name__}: {err})") from None
    return ModelCard(
        name="cryovesnet-reference",
        architecture=arch,
        voxel_size_nm=2.2,
        normalization={"method": "zscore"},
        invert=False,
        smooth_sigma=1.0,
        training_data=(
            "CryoVesNet reference training set: cryo-electron tomograms of synaptosomes "
            "(rat), manually segmented vesicles, rescaled to 2.2 nm voxels; 32^3 patches "
            "with > 1000 vesicle voxels; weighted binary cross-entropy (foreground 10)"),
        metrics={},
        created=_today(),
        cryoves_version=_version(),
        source=f"CryoVesNet reference weights, GPL-3.0 (Keras {keras_version} model {path.name})",
        license=REFERENCE_LICENSE,
        notes=(
            "Reference preprocessing, applied by cryoves by default: tomogram rescaled to 2.2 nm "
            "voxels, Gaussian smoothing sigma 1 voxel, then global z-score (x - mean) / std over "
            "the whole tomogram (training batches were z-scored per batch). Membranes dark (no "
            "inversion). The reference code casts the rescaled tomogram to int16 (which blanks "
            "float tomograms with small values); cryoves keeps floats. Reference inference: "
            "64^3 tiles, central 24^3 kept, optional flip/rotation TTA."),
    )


def load_reference_weights(path: PathLike) -> UNetModel:
    """Load the reference CryoVesNet weights (Keras 2.9 full model saved as HDF5).

    The reference file (``cryovesnet/weights/weights.h5`` in the CryoVesNet repository,
    GPL-3.0) holds a CSBDeep U-Net: depth 2, 2 convolutions per level, 16/32/64 filters,
    3x3x3 kernels, batch norm + ReLU + dropout 0.2 after every convolution, final 1x1x1
    convolution with a sigmoid, trained on 32^3 patches. The same architecture is built
    with :func:`build_unet` (``dropout=0.2``; dropout is inactive at inference) and every
    convolution and batch-norm layer's weights are copied in graph order, matched by
    layer type and array shape (not by name). The file is only read, never copied.

    The returned card prepares a tomogram as the reference inference does: rescale to
    2.2 nm voxels, Gaussian smoothing with sigma 1 voxel, then a global z-score
    ``(x - mean) / std`` over the whole volume, no contrast inversion (membranes dark).
    Override per call with ``predict_probability(..., preprocessing={"smooth_sigma": 0})``.

    Parameters
    ----------
    path : str or Path
        The reference ``weights.h5``.

    Returns
    -------
    UNetModel
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference weights {str(path)!r} not found")
    with _open_h5(path) as fh:
        if not _is_reference_h5(fh):
            raise ValueError(
                f"{str(path)!r} is not a Keras 2 full-model HDF5 file (no model_config / "
                "model_weights); cryoves weights are loaded with load_model()")
        card = _reference_card(path, fh)
        config, ref_layers = _read_reference_layers(fh)
    arch = card.architecture
    keras_model = build_unet(**arch)

    ref_conv = [a for _, cls, a in ref_layers if cls == "Conv3D"]
    ref_bn = [a for _, cls, a in ref_layers if cls == "BatchNormalization"]
    our_conv = _layers_of(keras_model, "Conv3D")
    our_bn = _layers_of(keras_model, "BatchNormalization")
    if len(ref_conv) != len(our_conv) or len(ref_bn) != len(our_bn):
        raise ValueError(
            f"{path}: reference model has {len(ref_conv)} Conv3D / {len(ref_bn)} "
            f"BatchNormalization layers, the rebuilt U-Net {len(our_conv)} / {len(our_bn)}: "
            "unsupported variant")
    try:
        for i, (src, dst) in enumerate(zip(ref_conv, our_conv)):
            _set_checked(dst, [src["kernel"], src["bias"]], f"Conv3D #{i}")
        for i, (src, dst) in enumerate(zip(ref_bn, our_bn)):
            _set_checked(dst, [src["gamma"], src["beta"], src["moving_mean"],
                               src["moving_variance"]], f"BatchNormalization #{i}")
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: weights do not fit the rebuilt U-Net: {err}") from None
    return UNetModel(keras_model, card, path)


def _set_checked(layer, arrays, what: str) -> None:
    current = layer.get_weights()
    if len(current) != len(arrays):
        raise ValueError(f"{what}: expected {len(current)} arrays, reference has {len(arrays)}")
    for cur, new in zip(current, arrays):
        if tuple(cur.shape) != tuple(new.shape):
            raise ValueError(
                f"{what} ({layer.name}): shape {tuple(new.shape)} in the reference file, "
                f"{tuple(cur.shape)} in the rebuilt U-Net")
    layer.set_weights([np.asarray(a, dtype=np.float32) for a in arrays])


def new_model(name: str = "untrained", voxel_size_nm: float = 2.2,
              normalization: Optional[dict] = None, invert: bool = False,
              seed: Optional[int] = None, **architecture: Any) -> UNetModel:
    """A freshly initialised (untrained) :class:`UNetModel` with a card.

    Used to start training and, with a small architecture, in tests.

    Parameters
    ----------
    name : str
        Model name for the card.
    voxel_size_nm : float
        Voxel size the model will be trained at.
    normalization : dict, optional
        Card normalisation; default percentile 1 / 99.8.
    invert : bool
        Contrast inversion flag for the card.
    seed : int, optional
        Seed for the weight initialisation (``keras.utils.set_random_seed``).
    **architecture
        :func:`build_unet` arguments.

    Returns
    -------
    UNetModel
    """
    from cryoves._tf import import_keras

    if normalization is None:
        normalization = {"method": "percentile", "p_low": 1.0, "p_high": 99.8}
    card = ModelCard(name=name, architecture=dict(architecture), voxel_size_nm=voxel_size_nm,
                     normalization=normalization, invert=invert, created=_today(),
                     cryoves_version=_version(), source="untrained (random initialisation)")
    if seed is not None:
        import_keras().utils.set_random_seed(int(seed))
    return UNetModel(build_unet(**card.architecture), card)
