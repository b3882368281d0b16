"""Voxel-size-aware, tiled, blended U-Net prediction: tomogram -> probability map.

:func:`predict_probability` does, in order:

1. **Checks** the input (3-D, finite; the voxel size with
   :func:`cryoves.table.check_voxel_size`).
2. **Resamples** the tomogram to the voxel size the model was trained at
   (``model.card.voxel_size_nm``). Shrinking is anti-aliased: a Gaussian low-pass with
   ``sigma = (1/f - 1) / 2`` output voxels (as :func:`skimage.transform.rescale`) is
   applied before linear interpolation. Interpolation uses ``grid_mode=True`` so voxel
   *edges* of the two grids coincide: a structure keeps its physical position, and the
   map resampled back lies exactly on the input grid. Voxel sizes within 1 % of the
   model's are not resampled.
3. **Preprocesses** as the model card says (:attr:`cryoves.model.ModelCard.preprocessing`,
   applied by :func:`preprocess`): contrast inverted if ``invert``; Gaussian smoothing with
   ``smooth_sigma`` voxels of the model grid (0 = none; the reference CryoVesNet weights use
   1); normalisation by percentiles or a global z-score (floats, statistics on a regular
   subsample of at most ~2 M voxels). ``preprocessing=`` overrides any of these per call.
4. **Predicts tiles.** The volume is padded (reflection) to a multiple of the pooling
   factor ``2**n_depth`` and cut into a grid of equal tiles whose origins lie on the
   pooling grid. Each tile discards a *halo* of ``halo`` voxels on sides that face
   another tile (default: the exact receptive-field radius, 23 voxels for the default
   net, so tiled prediction equals one whole-volume pass to float rounding) and is
   blended with its neighbours by cosine ramps of ``blend`` voxels, normalised by the
   (separable) sum of weights. Tiles are as large as ``max_tile_voxels`` allows and
   chosen to minimise the voxels pushed through the net; at the volume border a tile
   uses the network's own zero padding, as a whole-volume pass would, so the border costs
   no halo. Volumes of at least :data:`STREAM_VOXELS` voxels that need no resampling are
   preprocessed tile by tile from the (memory-mapped) input, with the same numbers, and at most
   :data:`STREAM_MAX_TILE_VOXELS` voxels per network call, to bound the memory.
   Prediction runs on the batch-norm-folded twin of the network
   (:meth:`cryoves.model.UNetModel.inference_model`) with ``predict_on_batch``.
5. **Resamples back** to exactly the input shape (linear) and clips to [0, 1].

Test-time augmentation (``tta=True``) averages the 8 flips of every tile.

**Scale and large regions.** A network learns the sizes it was shown: the default model,
trained on outer radii up to ~30 nm, leaves larger vesicles empty or hollow in its map.
``scale=0.6`` runs it on the tomogram shrunk (a 32 nm vesicle looks like a 19 nm one);
``min_region_radius_nm`` then keeps only the regions of ``p > 0.5`` at least that large (with
a 4 nm margin), zero elsewhere. :func:`cryoves.pipeline.segment` uses such a map to propose
large vesicles, each verified by its membrane
(:func:`cryoves.threshold.add_weak_segments`), instead of mixing it into the main map: a
shrunk view also sees look-alikes. (The reference CryoVesNet has a related option,
``run_deep_at_multiple_rescale``, which keeps the maximum of several rescaled passes.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import product
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from cryoves._parallel import slab_map
from cryoves._progress import ProgressCallback, report
from cryoves.io import release_pages
from cryoves.table import check_voxel_size

__all__ = ["predict_probability", "to_input_grid", "model_grid_shape", "large_regions", "plan_tiles", "TilePlan", "resample", "normalize", "preprocess",
           "DEFAULT_MAX_TILE_VOXELS", "DEFAULT_BLEND", "tile_budget"]

#: Default memory budget: voxels per network call (tile voxels x batch). The folded
#: default U-Net needs about 330 bytes per voxel on a CPU, so 9 M voxels ~ 3 GB.
DEFAULT_MAX_TILE_VOXELS = 9_000_000
#: When the network computes in bfloat16 through :meth:`cryoves.model.UNetModel.predictor` (its
#: lighter graph), a network call needs about 107 bytes per voxel instead of 208 in the Keras
#: bfloat16 graph and 340 in float32 (measured on a 160x220x220 tile of the folded default U-Net,
#: TensorFlow 2.21, CPU): tiles may then hold this many times ``max_tile_voxels`` voxels, in no more
#: memory than the Keras bfloat16 graph took at ``max_tile_voxels`` (fewer tiles, fewer voxels
#: computed twice in their halos). Not applied to large volumes, whose budget
#: (:data:`STREAM_MAX_TILE_VOXELS`) bounds the memory of the whole run.
BF16_TILE_VOXELS_FACTOR = 1.9
#: Default width (voxels) of the cosine blending ramp between neighbouring tiles.
DEFAULT_BLEND = 8
_RESAMPLE_RTOL = 0.01
_STATS_VOXELS = 2_000_000
_FLIPS = [tuple(ax for ax, f in zip((0, 1, 2), bits) if f) for bits in product((0, 1), repeat=3)]


# --------------------------------------------------------------------------------------
# Tile planning
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one prediction go.

    Attributes
    ----------
    shape : tuple of int
        Padded volume shape (multiples of ``divisor``).
    tile_shape : tuple of int
        Shape of every tile.
    starts : tuple of tuple of int
        Tile origins per axis (the tiles are their Cartesian product).
    halo, blend, divisor : int
        Discarded margin, blending ramp width, pooling factor.
    """

    shape: Tuple[int, int, int]
    tile_shape: Tuple[int, int, int]
    starts: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]
    halo: int
    blend: int
    divisor: int

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return int(np.prod([len(s) for s in self.starts]))

    @property
    def voxels_computed(self) -> int:
        """Voxels pushed through the network (once, without TTA)."""
        return self.n_tiles * int(np.prod(self.tile_shape))

    def overhead(self, n_voxels: Optional[int] = None) -> float:
        """Voxels computed / voxels of the (unpadded) volume, default: the padded one."""
        n = int(np.prod(self.shape)) if n_voxels is None else int(n_voxels)
        return self.voxels_computed / n

    def tiles(self):
        """Iterate over tile origins ``(z, y, x)``."""
        return product(*self.starts)

    def axis_weights(self, axis: int, start: int) -> np.ndarray:
        """1-D blending weight of a tile starting at ``start`` along ``axis``."""
        return _axis_weight(self.tile_shape[axis], start, self.shape[axis], self.halo,
                            self.blend)


def _ceil_to(n: int, d: int) -> int:
    return -(-int(n) // d) * d


def _floor_to(n: int, d: int) -> int:
    return (int(n) // d) * d


def _axis_starts(length: int, tile: int, halo: int, blend: int, d: int):
    """Evenly spread, pooling-aligned tile origins, or None if ``tile`` cannot work."""
    if tile >= length:
        return (0,)
    step_max = _floor_to(tile - 2 * halo - blend, d)
    if step_max <= 0:
        return None
    n = 1 + -(-(length - tile) // step_max)
    span = length - tile
    starts = [_floor_to(round(i * span / (n - 1), 6), d) for i in range(n - 1)] + [span]
    return tuple(sorted(set(starts)))


def _axis_weight(tile: int, start: int, length: int, halo: int, blend: int) -> np.ndarray:
    w = np.ones(tile, dtype=np.float64)
    if blend > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(blend) + 0.5) / blend)
    else:
        ramp = np.zeros(0)
    if start > 0:
        w[:halo] = 0.0
        w[halo:halo + blend] = ramp[: max(0, min(blend, tile - halo))]
    if start + tile < length:
        if halo > 0:
            w[tile - halo:] = 0.0
        lo = tile - halo - blend
        w[lo:tile - halo] *= ramp[::-1][: tile - halo - lo]
    return w


def plan_tiles(shape: Sequence[int], divisor: int = 4, halo: int = 23,
               blend: int = DEFAULT_BLEND, tile_shape: Optional[Sequence[int]] = None,
               max_tile_voxels: int = DEFAULT_MAX_TILE_VOXELS) -> TilePlan:
    """Choose tiles for a volume.

    Parameters
    ----------
    shape : sequence of 3 int
        Volume shape on the model grid (it is padded up to multiples of ``divisor``).
    divisor : int
        Pooling factor ``2**n_depth``: tile sides and origins are multiples of it.
    halo : int
        Voxels discarded on every tile side that faces another tile.
    blend : int
        Width of the cosine ramp between neighbouring tiles' kept regions.
    tile_shape : sequence of 3 int, optional
        Fixed tile shape (rounded up to multiples of ``divisor``, capped at the volume).
        Default: the tiling with the fewest voxels computed whose tiles hold at most
        ``max_tile_voxels`` voxels.
    max_tile_voxels : int
        Memory budget per tile.

    Returns
    -------
    TilePlan
    """
    d = int(divisor)
    halo, blend = int(halo), int(blend)
    if halo < 0 or blend < 0:
        raise ValueError("halo and blend must be >= 0")
    padded = tuple(_ceil_to(max(1, int(s)), d) for s in shape)
    if tile_shape is not None:
        if len(tile_shape) != 3:
            raise ValueError(f"tile_shape must have 3 entries (Z, Y, X), got {tile_shape}")
        tiles = tuple(min(_ceil_to(max(1, int(t)), d), p) for t, p in zip(tile_shape, padded))
        starts = []
        for ax in range(3):
            s = _axis_starts(padded[ax], tiles[ax], halo, blend, d)
            if s is None:
                raise ValueError(
                    f"tile_shape[{ax}]={tiles[ax]} is too small for halo {halo} and blend "
                    f"{blend}: a tile must be larger than 2*halo + blend + {d} = "
                    f"{2 * halo + blend + d} (or cover the whole axis, {padded[ax]})")
            starts.append(s)
        return TilePlan(padded, tiles, tuple(starts), halo, blend, d)

    # Candidate (tile length, starts) per axis: for each tile count, the smallest tile.
    min_tile = _ceil_to(2 * halo + blend + d, d)
    candidates = []
    for ax in range(3):
        length = padded[ax]
        by_count = {1: (length, (0,))}
        for n in range(2, 65):
            t = max(min_tile, _ceil_to(math.ceil((length + (n - 1) * (2 * halo + blend)) / n), d))
            starts = None
            while t < length:
                starts = _axis_starts(length, t, halo, blend, d)
                if starts is not None and len(starts) <= n:
                    break
                t += d
            if t >= length or starts is None:
                continue
            k = len(starts)
            if k not in by_count or t < by_count[k][0]:
                by_count[k] = (t, starts)
            if t <= min_tile:
                break
        candidates.append([by_count[k] for k in sorted(by_count)])
    best = None
    for (tz, sz), (ty, sy), (tx, sx) in product(*candidates):
        vox = tz * ty * tx
        if vox > max_tile_voxels:
            continue
        cost = vox * len(sz) * len(sy) * len(sx)
        key = (cost, len(sz) * len(sy) * len(sx))
        if best is None or key < best[0]:
            best = (key, (tz, ty, tx), (sz, sy, sx))
    if best is None:  # budget below the smallest possible tile: take the smallest
        (tz, sz), (ty, sy), (tx, sx) = (c[-1] for c in candidates)
        best = (None, (tz, ty, tx), (sz, sy, sx))
    return TilePlan(padded, best[1], best[2], halo, blend, d)


# --------------------------------------------------------------------------------------
# Resampling and normalisation
# --------------------------------------------------------------------------------------
def resample(volume: np.ndarray, shape: Sequence[int], order: int = 1,
             anti_alias: bool = True, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Resample a volume onto a grid of ``shape`` covering the same physical box.

    Voxel edges of both grids coincide (``grid_mode=True``): voxel ``i`` of the output
    is centred at input coordinate ``(i + 0.5) * n_in / n_out - 0.5``.

    Parameters
    ----------
    volume : ndarray
        Input, not modified.
    shape : sequence of int
        Output shape.
    order : int
        Spline order (1 = linear).
    anti_alias : bool
        Gaussian low-pass (``sigma = (n_in/n_out - 1) / 2`` input voxels) on axes that
        shrink, to avoid aliasing.
    out : ndarray of float32, optional
        Write the result here (e.g. a memory-mapped file), shape ``shape``.

    Returns
    -------
    ndarray of float32
        ``out`` when given.
    """
    vol = np.asarray(volume, dtype=np.float32)
    shape = tuple(int(s) for s in shape)
    if out is not None and (tuple(out.shape) != shape or out.dtype != np.float32):
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if shape == vol.shape:
        if out is None:
            return vol.copy()
        out[...] = vol
        return out
    factors = tuple(o / i for o, i in zip(shape, vol.shape))
    if anti_alias and any(f < 1 for f in factors):
        sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
        vol = _gaussian_filter(vol, sigma, mode="mirror")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    _zoom_linear_grid(vol, out, order)
    return out


def _zoom_linear_grid(vol: np.ndarray, out: np.ndarray, order: int) -> None:
    """``scipy.ndimage.zoom(vol, out.shape / vol.shape, output=out, order=order, mode="nearest",
    grid_mode=True, prefilter=False)``, the same numbers, in slabs of ``out`` on the process's cores.

    scipy's zoom computes each output voxel from its own coordinates along every axis
    (``(k + 0.5) * n_in / n_out - 0.5`` in grid mode, with ``k`` the output index plus the
    ``shift`` argument of its C routine); a slab starting at plane ``z0`` with the shift ``z0``
    (an integer, so ``k + z0`` is exact) therefore gets exactly the whole call's values. That
    routine (``scipy.ndimage._nd_image.zoom_shift``) is private: it is checked once per process
    against :func:`scipy.ndimage.zoom` on a small volume, and the whole-volume call is used if it
    is missing or differs.
    """
    shape = tuple(int(n) for n in out.shape)
    if order > 1 or vol.ndim != 3 or not _slab_zoom_ok():
        factors = tuple(o / i for o, i in zip(shape, vol.shape))
        ndimage.zoom(vol, factors, output=out, order=order, mode="nearest", grid_mode=True, prefilter=False)
        return
    zoom = np.ascontiguousarray(np.divide(np.array(vol.shape), np.array(shape), dtype=np.float64))
    mode = _NEAREST_CODE

    def run(z0, z1):
        shift = np.array([float(z0), 0.0, 0.0])
        ndimage._nd_image.zoom_shift(vol, zoom, shift, out[z0:z1], order, mode, 0.0, 0, True)

    slab_map(run, shape[0], shape[0])


_NEAREST_CODE = 0  # scipy.ndimage's code of mode "nearest" (checked by _slab_zoom_ok)


@functools.lru_cache(maxsize=None)
def _slab_zoom_ok() -> bool:
    """Whether :func:`_zoom_linear_grid` may zoom slab by slab (scipy's private routine as expected;
    checked once per process)."""
    ok = False
    try:
        from scipy.ndimage import _ni_support

        if _ni_support._extend_mode_to_code("nearest") == _NEAREST_CODE:
            rng = np.random.default_rng(0)
            for ish, osh in (((7, 9, 5), (10, 6, 8)), ((10, 6, 8), (7, 9, 5))):
                v = rng.normal(size=ish).astype(np.float32)
                ref = ndimage.zoom(v, tuple(o / i for o, i in zip(osh, ish)), order=1, mode="nearest",
                                   grid_mode=True, prefilter=False)
                got = np.empty(osh, dtype=np.float32)
                zoom = np.ascontiguousarray(np.divide(np.array(ish), np.array(osh), dtype=np.float64))
                for z0 in range(0, osh[0], 3):
                    ndimage._nd_image.zoom_shift(v, zoom, np.array([float(z0), 0.0, 0.0]), got[z0:z0 + 3],
                                                 1, _NEAREST_CODE, 0.0, 0, True)
                ok = ref.shape == osh and np.array_equal(got, ref)
                if not ok:
                    break
    except Exception:  # noqa: BLE001 - a changed private routine: fall back to the public zoom
        ok = False
    return bool(ok)


def _gaussian_filter(vol: np.ndarray, sigma: Sequence[float], mode: str) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(vol, sigma, mode=mode)`` (a new float32 array), the same numbers.

    As scipy does, one 1-D filter per axis, each on the previous one's output; the first reads
    ``vol`` block by block (blocks along an axis it does not filter) and releases a memory-mapped
    ``vol``'s pages after each (:func:`cryoves.io.release_pages`), so that the input is not held
    in memory next to the result. Every pass runs on the process's cores (:func:`_filter_1d`).
    """
    axes = [(ax, float(s)) for ax, s in enumerate(sigma) if s > 1e-15]  # scipy's own rule
    out = np.empty(vol.shape, dtype=np.float32)
    if not axes:
        out[...] = vol
        return out
    (ax0, s0), rest = axes[0], axes[1:]
    other = next(a for a in range(vol.ndim) if a != ax0)
    step = max(1, _SLAB_VOXELS // max(1, vol.size // max(1, vol.shape[other])))

    def first(i0, i1):
        idx = [slice(None)] * vol.ndim
        idx[other] = slice(i0, i1)
        idx = tuple(idx)
        ndimage.gaussian_filter1d(np.asarray(vol[idx], dtype=np.float32), s0, ax0, output=out[idx], mode=mode)
        release_pages(vol)

    slab_map(first, vol.shape[other], step)
    for ax, s in rest:
        _filter_1d(out, s, ax, mode)
    return out


def _filter_1d(vol: np.ndarray, sigma: float, axis: int, mode: str, truncate: float = 4.0) -> None:
    """``scipy.ndimage.gaussian_filter1d(vol, sigma, axis, output=vol, mode=mode, truncate=truncate)`` in place.

    In blocks along another axis, on the process's cores (:func:`cryoves._parallel.slab_map`):
    the filter computes every line along ``axis`` on its own, from that line alone, so the
    blocks give exactly the numbers of one call on the whole volume.
    """
    if vol.ndim < 2:
        ndimage.gaussian_filter1d(vol, sigma, axis, output=vol, mode=mode, truncate=truncate)
        return
    other = 1 if axis == 0 else 0
    # lines along a strided axis: scipy's own arithmetic on whole planes (contiguous), when it is
    # checked to give scipy's numbers (:func:`_planewise_ok`); ~4x faster than scipy's strided lines
    fast = (mode == "nearest" and vol.ndim == 3 and axis < 2 and vol.dtype == np.float32
            and _planewise_ok())
    weights = _gauss_weights(sigma, truncate) if fast else None
    rows = 4 if axis == 0 else 1  # blocks that stay in the cache

    def run(i0, i1):
        idx = [slice(None)] * vol.ndim
        if fast:
            for j0 in range(i0, i1, rows):
                idx[other] = slice(j0, min(i1, j0 + rows))
                block = vol[tuple(idx)]
                _correlate_nearest_planewise(block, weights, axis, block)
            return
        idx[other] = slice(i0, i1)
        block = vol[tuple(idx)]
        ndimage.gaussian_filter1d(block, sigma, axis, output=block, mode=mode, truncate=truncate)

    slab_map(run, vol.shape[other], vol.shape[other])


def _gauss_weights(sigma: float, truncate: float) -> np.ndarray:
    """The (float64) weights that ``scipy.ndimage.gaussian_filter1d`` correlates with (order 0)."""
    from scipy.ndimage._filters import _gaussian_kernel1d

    lw = int(float(truncate) * float(sigma) + 0.5)
    return np.asarray(_gaussian_kernel1d(float(sigma), 0, lw)[::-1], dtype=np.float64)


def _correlate_nearest_planewise(block: np.ndarray, weights: np.ndarray, axis: int, out: np.ndarray) -> None:
    """``scipy.ndimage.correlate1d(block, weights, axis, output=out, mode="nearest")`` for symmetric
    ``weights`` of odd length, computed on whole planes with scipy's own float64 arithmetic: per voxel
    ``x[0] * w[0]``, then ``+ (x[-j] + x[+j]) * w[-j]`` for ``j`` from the radius down to 1, rounded to
    float32 once. ``out`` may be ``block`` (the input is copied first)."""
    lw = len(weights) // 2
    n = block.shape[axis]

    def sl(a, b):
        idx = [slice(None)] * block.ndim
        idx[axis] = slice(a, b)
        return tuple(idx)

    shape = list(block.shape)
    shape[axis] = n + 2 * lw
    xp = np.empty(shape, dtype=np.float64)
    xp[sl(lw, lw + n)] = block
    xp[sl(0, lw)] = block[sl(0, 1)]  # "nearest": the edge value repeated
    xp[sl(lw + n, lw + n + lw)] = block[sl(n - 1, n)]
    acc = xp[sl(lw, lw + n)] * weights[lw]
    tmp = np.empty_like(acc)
    for j in range(lw, 0, -1):
        np.add(xp[sl(lw - j, lw - j + n)], xp[sl(lw + j, lw + j + n)], out=tmp)
        tmp *= weights[lw - j]
        acc += tmp
    out[...] = acc


@functools.lru_cache(maxsize=None)
def _planewise_ok() -> bool:
    """Whether :func:`_correlate_nearest_planewise` gives ``scipy.ndimage.gaussian_filter1d``'s numbers
    here (checked once per process on small volumes, lines shorter and longer than the kernel)."""
    try:
        rng = np.random.default_rng(0)
        for shape, sigma, axis in (((12, 5, 7), 1.0, 0), ((6, 11, 4), 1.0, 1), ((3, 4, 5), 1.0, 0),
                                   ((9, 3, 4), 2.3, 0), ((4, 17, 3), 0.7, 1)):
            v = (rng.normal(size=shape) * 50).astype(np.float32)
            ref = ndimage.gaussian_filter1d(v, sigma, axis, mode="nearest", truncate=4.0)
            w = _gauss_weights(sigma, 4.0)
            if not (len(w) % 2 == 1 and np.array_equal(w, w[::-1])):
                return False
            got = np.empty_like(v)
            _correlate_nearest_planewise(v, w, axis, got)
            if not np.array_equal(got, ref):
                return False
    except Exception:  # noqa: BLE001 - a changed private routine: scipy's own filter
        return False
    return True


def _smooth_inplace(vol: np.ndarray, sigma: float) -> None:
    """``scipy.ndimage.gaussian_filter(vol, sigma, output=vol, mode="nearest", truncate=4.0)``, the same
    numbers (one 1-D pass per axis, as scipy does), each pass on the process's cores."""
    if sigma <= 1e-15:  # scipy's rule: no filtering along such an axis
        return
    for ax in range(vol.ndim):
        _filter_1d(vol, sigma, ax, "nearest", 4.0)


def _subsample(vol: np.ndarray, n_max: int = _STATS_VOXELS) -> np.ndarray:
    step = max(1, int(math.ceil((vol.size / n_max) ** (1.0 / 3.0))))
    return np.asarray(vol[::step, ::step, ::step], dtype=np.float64).ravel()


def normalize(volume: np.ndarray, normalization: dict, invert: bool = False) -> np.ndarray:
    """Normalise a volume as a model card says; returns a new float32 array.

    Parameters
    ----------
    volume : ndarray
        Tomogram (not modified).
    normalization : dict
        ``{"method": "percentile", "p_low": float, "p_high": float}`` ->
        ``(x - P_low) / (P_high - P_low)``; ``{"method": "zscore"}`` ->
        ``(x - mean) / std``. Statistics come from a regular subsample of at most ~2 M
        voxels.
    invert : bool
        Negate the contrast first.

    Returns
    -------
    ndarray of float32
    """
    vol = np.array(volume, dtype=np.float32, copy=True)
    if invert:
        np.negative(vol, out=vol)
    _normalize_inplace(vol, normalization)
    return vol


def _normalize_inplace(vol: np.ndarray, normalization: dict) -> None:
    offset, scale = _statistics_of(_subsample(vol), normalization)
    vol -= np.float32(offset)
    vol *= np.float32(1.0 / scale)


def _statistics_of(sub: np.ndarray, normalization: dict):
    """``(offset, scale)`` of a normalisation from a (float64) subsample of the volume."""
    method = normalization.get("method")
    if method == "percentile":
        lo, hi = np.percentile(sub, [float(normalization["p_low"]),
                                     float(normalization["p_high"])])
        offset, scale = lo, hi - lo
    elif method == "zscore":
        offset, scale = sub.mean(), sub.std()
    else:
        raise ValueError(f"unknown normalization method {method!r}")
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0  # constant volume: only shift it
    return offset, scale


def preprocess(volume: np.ndarray, preprocessing: dict, *, copy: bool = True) -> np.ndarray:
    """Prepare a volume (already on the model's grid) for the network.

    In order: contrast inversion (``invert``), Gaussian smoothing with ``smooth_sigma``
    voxels (``scipy.ndimage.gaussian_filter``, ``mode="nearest"``, truncated at 4 sigma; 0 =
    none), then normalisation (:func:`normalize`; its statistics are those of the smoothed
    volume, as in the reference CryoVesNet inference).

    Parameters
    ----------
    volume : ndarray
        Tomogram resampled to the model's voxel size. Not modified when ``copy`` is True.
    preprocessing : dict
        ``{"smooth_sigma": float, "normalization": dict, "invert": bool}``, e.g.
        :attr:`cryoves.model.ModelCard.preprocessing`; missing keys mean no smoothing and
        no inversion (``normalization`` is required).
    copy : bool
        False: work in place when ``volume`` already is a float32 array (saves one
        volume of memory; the caller owns that array).

    Returns
    -------
    ndarray of float32
    """
    if "normalization" not in preprocessing:
        raise ValueError("preprocessing needs a 'normalization' (see cryoves.model.ModelCard)")
    if copy or not (isinstance(volume, np.ndarray) and volume.dtype == np.float32):
        vol = np.array(volume, dtype=np.float32, copy=True)
    else:
        vol = volume
    if preprocessing.get("invert", False):
        np.negative(vol, out=vol)
    sigma = float(preprocessing.get("smooth_sigma", 0.0) or 0.0)
    if sigma > 0:
        _smooth_inplace(vol, sigma)
    _normalize_inplace(vol, preprocessing["normalization"])
    return vol


# --------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------
def _check_input(tomogram, voxel_size) -> Tuple[np.ndarray, float]:
    if not hasattr(tomogram, "shape") or not hasattr(tomogram, "dtype"):
        tomogram = np.asarray(tomogram)
    if tomogram.ndim != 3:
        raise ValueError(
            f"tomogram must be a 3-D (Z, Y, X) array, got {tomogram.ndim}-D with shape "
            f"{tuple(tomogram.shape)}; for a stack of 2-D images add nothing, for a "
            "multi-channel volume pass one channel")
    if min(tomogram.shape) < 1:
        raise ValueError(f"tomogram is empty (shape {tuple(tomogram.shape)})")
    kind = np.dtype(tomogram.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"tomogram must hold real numbers, got dtype {tomogram.dtype}")
    vs = check_voxel_size(voxel_size)
    if kind == "f":
        n_nan = n_inf = 0
        for z in range(tomogram.shape[0]):  # slice by slice: no volume-sized temporary
            sl = np.asarray(tomogram[z])
            bad = ~np.isfinite(sl)
            if bad.any():
                n_nan += int(np.isnan(sl[bad]).sum())
                n_inf += int(bad.sum()) - int(np.isnan(sl[bad]).sum())
        if n_nan or n_inf:
            raise ValueError(
                f"tomogram contains {n_nan} NaN and {n_inf} infinite value(s) out of "
                f"{tomogram.size}; replace them first (e.g. np.nan_to_num(tomo, "
                "nan=np.nanmean(tomo)))")
    return tomogram, vs


def _resolve_model(model):
    """A UNetModel from ``None`` (default weights), a path, or a UNetModel.

    Paths go through :func:`cryoves.model.get_model`, the one shared model cache (keyed by
    the resolved path and modification time), so repeated calls do not rebuild the network.
    """
    import os

    from cryoves.model import UNetModel, get_model

    if isinstance(model, UNetModel):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        return get_model(model)
    raise TypeError(
        "model must be a cryoves.model.UNetModel (see cryoves.model.load_model), a path "
        f"to weights, or None for the default weights; got {type(model).__name__}")


def predict_probability(tomogram, voxel_size: float, model=None, *,
                        tile_shape: Optional[Sequence[int]] = None,
                        halo: Optional[int] = None,
                        batch_size: Optional[int] = None,
                        tta: bool = False,
                        progress: ProgressCallback = None,
                        blend: int = DEFAULT_BLEND,
                        max_tile_voxels: int = DEFAULT_MAX_TILE_VOXELS,
                        preprocessing: Optional[dict] = None,
                        scale: float = 1.0,
                        min_region_radius_nm: Optional[float] = None) -> np.ndarray:
    """Probability that each voxel belongs to a vesicle, on the input grid.

    Parameters
    ----------
    tomogram : ndarray, shape (Z, Y, X)
        The tomogram (membranes dark). Any real dtype; memory-mapped arrays are fine.
        Not modified.
    voxel_size : float
        Voxel size of ``tomogram`` in nm (isotropic).
    model : UNetModel or str or Path, optional
        The network; a path is loaded with :func:`cryoves.model.load_model`; ``None``
        loads the default shipped weights.
    tile_shape : sequence of 3 int, optional
        Tile shape on the model grid (multiples of ``2**n_depth`` after rounding up).
        Default: the tiling with the fewest computed voxels under ``max_tile_voxels``
        (whole depth in Z when it fits).
    halo : int, optional
        Voxels (model grid) discarded on tile sides facing another tile. Default: the
        network's receptive-field radius (23 for the default net), which makes the result
        equal to a single whole-volume pass.
    batch_size : int, optional
        Tiles per network call. Default: as many as fit ``max_tile_voxels`` (at least 1).
    tta : bool
        Test-time augmentation: average the predictions of the 8 flips (Z, Y, X) of
        every tile (8x the compute).
    progress : callable, optional
        ``progress("predict", done, total)`` after every batch (``done`` batches of
        ``total``; also once with 0 before the first). Raise :class:`cryoves.Cancelled`
        from it to stop.
    blend : int
        Width (voxels) of the cosine ramp between neighbouring tiles.
    max_tile_voxels : int
        Memory budget: voxels per network call (about 330 bytes each on a CPU in float32). When
        the network computes in bfloat16 (about 107 bytes per voxel,
        :meth:`cryoves.model.UNetModel.predictor`) and the volume is not large (below
        :data:`STREAM_VOXELS`), tiles may hold :data:`BF16_TILE_VOXELS_FACTOR` times as many
        (:func:`tile_budget`).
    preprocessing : dict, optional
        Override the model card's preprocessing for this call: any of ``smooth_sigma``
        (Gaussian sigma in voxels at the model's voxel size, 0 = none), ``normalization``
        (``{"method": "zscore"}`` or ``{"method": "percentile", "p_low": .., "p_high": ..}``)
        and ``invert``; keys left out keep the card's values. Default: the card's
        (:attr:`cryoves.model.ModelCard.preprocessing`). Example:
        ``preprocessing={"smooth_sigma": 0}`` runs the reference weights without their
        smoothing.
    scale : float
        Size at which the network sees the tomogram, relative to the model's voxel size
        (0.25-4; 1.0 = as trained; 0.75 = shrunk, so vesicles look 25 % smaller and those
        larger than the training range are recognised; costs ``scale**3`` of a pass at 1.0).
    min_region_radius_nm : float, optional
        Keep only the 6-connected regions of ``p > 0.5`` whose volume is that of a sphere of at
        least this radius (nm), with a 4 nm margin around them; 0 elsewhere (computed on the
        model grid). ``None`` (default): the whole map.

    Returns
    -------
    ndarray of float32, same shape as ``tomogram``
        Probabilities in [0, 1].

    Raises
    ------
    ValueError
        If the input is not 3-D, holds NaN/Inf, ``voxel_size`` is not positive,
        ``preprocessing`` has an unknown key or an invalid value, ``scale`` is outside 0.25-4,
        or ``min_region_radius_nm`` is not positive.
    cryoves.Cancelled
        If the progress callback raises it.
    """
    prob, in_shape = _predict_on_model_grid(
        tomogram, voxel_size, model, tile_shape=tile_shape, halo=halo, batch_size=batch_size, tta=tta,
        progress=progress, blend=blend, max_tile_voxels=max_tile_voxels, preprocessing=preprocessing, scale=scale,
        min_region_radius_nm=min_region_radius_nm)
    return to_input_grid(prob, in_shape)


def _predict_on_model_grid(tomogram, voxel_size, model, *, tile_shape, halo, batch_size, tta, progress, blend,
                           max_tile_voxels, preprocessing, scale, min_region_radius_nm, out=None):
    """Steps 1-4 of :func:`predict_probability`: the map on the model grid (not clipped), and the input shape.

    ``out``: a zeroed float32 array (e.g. a memory-mapped file) of the model-grid shape to
    accumulate into; used only when the volume needs no resampling (else ignored).
    """
    tomogram, vs = _check_input(tomogram, voxel_size)
    model = _resolve_model(model)
    card = model.card
    if preprocessing is not None:
        if not isinstance(preprocessing, dict):
            raise TypeError(
                "preprocessing must be a dict with any of 'smooth_sigma', 'normalization', "
                f"'invert', got {type(preprocessing).__name__}")
        card = card.with_preprocessing(**preprocessing)  # validated copy; model unchanged
    scale = _check_scale(scale)
    if min_region_radius_nm is not None and not (np.isfinite(min_region_radius_nm) and min_region_radius_nm > 0):
        raise ValueError(f"min_region_radius_nm must be a positive number of nm, got {min_region_radius_nm!r}")
    in_shape = tuple(int(s) for s in tomogram.shape)

    # 1. resample to the model's voxel size (at this scale)
    factor = vs * scale / card.voxel_size_nm
    model_shape = model_grid_shape(in_shape, vs, card.voxel_size_nm, scale)
    if model_shape == in_shape and abs(factor - 1.0) <= _RESAMPLE_RTOL:
        vol = tomogram
    else:
        vol = resample(tomogram, model_shape, order=1, anti_alias=True)

    # 2.-3. invert, smooth, normalise; tiles
    rf_width, rf_radius = model.receptive_field
    halo = rf_radius if halo is None else int(halo)
    large_volume = int(np.prod(model_shape)) >= STREAM_VOXELS
    streamed = vol is tomogram and large_volume
    # a large volume (streamed or resampled, e.g. the large-vesicle pass) gets the smaller budget
    budget = tile_budget(model_shape, max_tile_voxels, model)
    if out is not None and (vol is not tomogram or tuple(out.shape) != model_shape):
        out = None
    plan = plan_tiles(model_shape, divisor=model.divisor, halo=halo, blend=blend, tile_shape=tile_shape,
                      max_tile_voxels=budget)
    pad_mode = "reflect" if min(model_shape) > 1 else "edge"
    if streamed:
        # a large volume on the model grid: preprocessed tile by tile from the (memory-mapped)
        # input, the same numbers without a preprocessed copy of the whole volume
        fetch = _StreamedTiles(tomogram, card.preprocessing, plan, pad_mode)
        prob = _predict_tiles(None, model, plan, batch_size, tta, progress, budget,
                              out_shape=model_shape, fetch=fetch, out=out)
        release_pages(tomogram)
    else:
        vol = preprocess(vol, card.preprocessing, copy=vol is tomogram)  # in place on our own copy
        release_pages(tomogram)
        # padding by index (as numpy.pad does it): tiles read the volume, no padded copy of it
        fetch = _PaddedTiles(vol, plan, pad_mode)
        del vol
        prob = _predict_tiles(None, model, plan, batch_size, tta, progress, budget,
                              out_shape=model_shape, fetch=fetch, out=out)
        del fetch
    if min_region_radius_nm is not None:  # on the model grid: vs / factor nm per voxel
        prob = large_regions(prob, vs / factor, min_region_radius_nm)
    return prob, in_shape


def tile_budget(model_shape: Sequence[int], max_tile_voxels: int = DEFAULT_MAX_TILE_VOXELS, model=None) -> int:
    """Voxels per network call that :func:`predict_probability` plans with for a volume of ``model_shape``.

    A large volume (at least :data:`STREAM_VOXELS` voxels) gets at most
    :data:`STREAM_MAX_TILE_VOXELS`; any other volume ``max_tile_voxels``, times
    :data:`BF16_TILE_VOXELS_FACTOR` when ``model``'s (default: the default weights')
    :meth:`~cryoves.model.UNetModel.predictor` is the lighter bfloat16 graph.
    """
    if int(np.prod([int(n) for n in model_shape])) >= STREAM_VOXELS:
        return min(int(max_tile_voxels), STREAM_MAX_TILE_VOXELS)
    from cryoves.model import _Bf16Forward, describe_weights, inference_precision

    # the default weights' architecture from their card (h5py only: no network built)
    arch = (_resolve_model(model).card.architecture if model is not None
            else describe_weights(None)["architecture"])
    if inference_precision() == "bfloat16" and _Bf16Forward.supports(arch):
        return int(int(max_tile_voxels) * BF16_TILE_VOXELS_FACTOR)
    return int(max_tile_voxels)


def model_grid_shape(shape: Sequence[int], voxel_size: float, model_voxel_size: float,
                     scale: float = 1.0) -> Tuple[int, int, int]:
    """Shape of a tomogram on the model's grid (:func:`predict_probability`, step 1).

    Parameters
    ----------
    shape : sequence of 3 int
        The tomogram's shape.
    voxel_size, model_voxel_size : float
        nm per voxel of the tomogram and of the model (``model.card.voxel_size_nm``).
    scale : float
        As in :func:`predict_probability`.

    Returns
    -------
    tuple of 3 int
        ``shape`` itself when the voxel sizes (times ``scale``) agree within 1 %.
    """
    shape = tuple(int(s) for s in shape)
    factor = float(voxel_size) * float(scale) / float(model_voxel_size)
    if abs(factor - 1.0) <= _RESAMPLE_RTOL:
        return shape
    return tuple(max(1, int(round(s * factor))) for s in shape)


def to_input_grid(prob: np.ndarray, shape: Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
    """Step 5 of :func:`predict_probability`: a model-grid map resampled (linear) to ``shape``, clipped to [0, 1].

    Parameters
    ----------
    prob : ndarray
        Map on the model grid. Modified (clipped) when it already has ``shape`` and ``out`` is None.
    shape : sequence of 3 int
        The tomogram's shape.
    out : ndarray of float32, optional
        Write the result here (e.g. a memory-mapped file); its pages are released as it is
        filled (:func:`cryoves.io.release_pages`).

    Returns
    -------
    ndarray of float32, C-contiguous (``out`` when given)
    """
    shape = tuple(int(s) for s in shape)
    step = _slab_rows(shape)
    if tuple(prob.shape) != shape:
        prob = resample(prob, shape, order=1, anti_alias=False, out=out)
    elif out is not None and out is not prob:
        for z0 in range(0, shape[0], step):
            out[z0:z0 + step] = prob[z0:z0 + step]
    if out is None:
        np.clip(prob, 0.0, 1.0, out=prob)
        return np.ascontiguousarray(prob, dtype=np.float32)
    for z0 in range(0, shape[0], step):  # slab by slab: the map's pages need not stay resident
        np.clip(out[z0:z0 + step], 0.0, 1.0, out=out[z0:z0 + step])
        release_pages(out)
    return out


def _slab_rows(shape) -> int:
    """Planes per slab of about :data:`_SLAB_VOXELS` voxels."""
    return max(1, _SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))


def _check_scale(scale) -> float:
    try:
        out = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number (1.0 = the model's own size), got {scale!r}") from None
    if not (np.isfinite(out) and 0.25 <= out <= 4.0):
        raise ValueError(f"scale must lie in 0.25-4 (1.0 = the model's own size), got {scale!r}")
    return out


def large_regions(probability: np.ndarray, voxel_size: float, min_radius_nm: float,
                  margin_nm: float = 4.0) -> np.ndarray:
    """The probability map where it holds a large region, 0 elsewhere.

    Parameters
    ----------
    probability : (Z, Y, X) array
        Probability map in [0, 1]. Not modified.
    voxel_size : float
        nm per voxel of ``probability``.
    min_radius_nm : float
        A 6-connected region of ``probability > 0.5`` is kept when its volume is at least that
        of a sphere of this radius.
    margin_nm : float
        Voxels within this distance of a kept region (its membrane, where ``p`` falls below
        0.5) are kept too.

    Returns
    -------
    ndarray of float32, same shape
    """
    from cryoves.threshold import _dilate6, _label_counts, _label_small

    vs = check_voxel_size(voxel_size)
    prob = np.asarray(probability, dtype=np.float32)
    # uint16 labels when they fit, counted slab by slab: no int32/int64 volume-sized temporaries
    labels, n = _label_small(prob > 0.5, ndimage.generate_binary_structure(3, 1))
    out = np.zeros(prob.shape, dtype=np.float32)
    if n == 0:
        return out
    sizes = _label_counts(labels)
    keep = sizes >= (4.0 / 3.0) * math.pi * (float(min_radius_nm) / vs) ** 3
    keep[0] = False
    if not keep.any():
        return out
    region = keep[labels]
    del labels
    it = int(round(float(margin_nm) / vs))
    if it > 0:
        region = _dilate6(region, it)
    out[region] = prob[region]
    return out


#: Volumes of at least this many voxels (on the model grid, when no resampling is needed) are
#: preprocessed tile by tile from the (memory-mapped) input rather than as one float32 copy: the
#: same numbers, one volume less memory, the smoothing of the tile overlaps computed again.
STREAM_VOXELS = 64 * 2 ** 20
_SLAB_VOXELS = 16 * 2 ** 20  # voxels per slab of the statistics pass
#: Voxels per network call for such volumes (at most). Measured on a 300x1000x1000 float32
#: tomogram (CPU): peak RSS while predicting 4.3 GB with this budget (98 tiles of 180x192x192, 2.17x
#: the voxels through the network), 5.6 GB with the default 9 M (70 tiles, 2.0x).
STREAM_MAX_TILE_VOXELS = 7_000_000


class _PaddedTiles:
    """Tiles of ``np.pad(vol, ..., mode=pad_mode)`` up to ``plan.shape``, read from ``vol`` (no padded copy)."""

    def __init__(self, vol: np.ndarray, plan: TilePlan, pad_mode: str):
        self.vol = vol
        self.index = [np.pad(np.arange(n), (0, p - n), mode=pad_mode) for n, p in zip(vol.shape, plan.shape)]
        self.tile = plan.tile_shape

    def __call__(self, z: int, y: int, x: int) -> np.ndarray:
        idx = [ind[s:s + t] for ind, s, t in zip(self.index, (z, y, x), self.tile)]
        return _take_box(self.vol, idx)


def _take_box(vol: np.ndarray, idx) -> np.ndarray:
    """``vol[np.ix_(*idx)]``; a view (slices) where every index run is contiguous."""
    if all(len(i) == i[-1] - i[0] + 1 and np.all(np.diff(i) == 1) for i in idx):
        return vol[tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)]
    return vol[np.ix_(*idx)]


class _StreamedTiles:
    """Preprocessed tiles of a volume, made one at a time, equal to :func:`preprocess` + padding.

    Smoothing a box that reaches ``radius`` voxels beyond the tile on every side that is not the
    volume's border gives, inside the tile, exactly the values of smoothing the whole volume
    (the same kernel over the same inputs); normalisation statistics come from the same regular
    subsample of the smoothed volume, gathered slab by slab; padding maps padded coordinates back
    onto the volume as :func:`numpy.pad` does.
    """

    def __init__(self, tomogram, preprocessing: dict, plan: TilePlan, pad_mode: str):
        if "normalization" not in preprocessing:
            raise ValueError("preprocessing needs a 'normalization' (see cryoves.model.ModelCard)")
        self.src = tomogram
        self.invert = bool(preprocessing.get("invert", False))
        self.sigma = float(preprocessing.get("smooth_sigma", 0.0) or 0.0)
        self.radius = int(4.0 * self.sigma + 0.5) if self.sigma > 0 else 0  # scipy's, truncate=4
        shape = tuple(int(n) for n in tomogram.shape)
        self.index = [np.pad(np.arange(n), (0, p - n), mode=pad_mode) for n, p in zip(shape, plan.shape)]
        self.tile = plan.tile_shape
        self.offset, self.scale = self._statistics(preprocessing["normalization"])

    def _smoothed(self, box) -> np.ndarray:
        """Inverted and smoothed ``src[box]`` (a new float32 array)."""
        a = np.array(self.src[box], dtype=np.float32, copy=True)
        if self.invert:
            np.negative(a, out=a)
        if self.sigma > 0:
            _smooth_inplace(a, self.sigma)
        return a

    def _statistics(self, normalization: dict):
        shape = self.src.shape
        n = int(np.prod(shape))
        step = max(1, int(math.ceil((n / _STATS_VOXELS) ** (1.0 / 3.0))))  # as _subsample
        rows = np.arange(0, shape[0], step)
        per_slab = max(1, _SLAB_VOXELS // max(1, shape[1] * shape[2] * step))
        parts = []
        r = self.radius
        for i in range(0, len(rows), per_slab):
            zs = rows[i:i + per_slab]
            z0, z1 = max(0, int(zs[0]) - r), min(shape[0], int(zs[-1]) + 1 + r)
            slab = self._smoothed((slice(z0, z1), slice(None), slice(None)))
            parts.append(np.asarray(slab[zs - z0, ::step, ::step], dtype=np.float64))
            release_pages(self.src)
        sub = np.concatenate(parts, axis=0).ravel()
        offset, scale = _statistics_of(sub, normalization)
        return np.float32(offset), np.float32(1.0 / scale)

    def __call__(self, z: int, y: int, x: int) -> np.ndarray:
        idx = [ind[s:s + t] for ind, s, t in zip(self.index, (z, y, x), self.tile)]
        box = tuple(slice(max(0, int(i.min()) - self.radius), min(n, int(i.max()) + 1 + self.radius))
                    for i, n in zip(idx, self.src.shape))
        a = self._smoothed(box)
        release_pages(self.src)  # the tile is copied: the map's pages need not stay resident
        a -= self.offset
        a *= self.scale
        return _take_box(a, [i - b.start for i, b in zip(idx, box)])


def _predict_tiles(vol: Optional[np.ndarray], model, plan: TilePlan, batch_size, tta: bool,
                   progress: ProgressCallback, max_tile_voxels: int,
                   out_shape: Optional[Sequence[int]] = None, fetch=None,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """Run the network over the tiles of ``plan`` and blend.

    ``vol`` is the preprocessed volume, already padded to ``plan.shape``, or None when
    ``fetch(z, y, x)`` makes each preprocessed tile. The result has ``out_shape`` (default
    ``plan.shape``): the padded margin beyond it is never stored. ``out``: a zeroed float32
    array of that shape to blend into (a memory-mapped file: its pages are released after every
    batch, so the map is not held in this process's memory); default: a new array.
    """
    net = model.predictor()
    tile = plan.tile_shape
    tile_vox = int(np.prod(tile))
    if batch_size is None:
        batch_size = max(1, int(max_tile_voxels) // tile_vox)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flips = _FLIPS if tta else [()]
    jobs = [(origin, flip) for origin in plan.tiles() for flip in flips]
    n_batches = -(-len(jobs) // batch_size)
    weights = [[plan.axis_weights(ax, s).astype(np.float32) for s in plan.starts[ax]]
               for ax in range(3)]
    index = [{s: i for i, s in enumerate(plan.starts[ax])} for ax in range(3)]

    out_shape = tuple(plan.shape) if out_shape is None else tuple(int(n) for n in out_shape)
    if out is None:
        out = np.zeros(out_shape, dtype=np.float32)
    elif tuple(out.shape) != out_shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {out_shape}, got {out.dtype} {tuple(out.shape)}")
    if fetch is None:
        def fetch(z, y, xx):
            return vol[z:z + tile[0], y:y + tile[1], xx:xx + tile[2]]
    report(progress, "predict", 0, n_batches)
    inv_n = np.float32(1.0 / len(flips))
    # one input buffer for every batch: no fresh memory (page faults) per network call
    x_buf = np.empty((min(batch_size, len(jobs)),) + tile + (1,), dtype=np.float32)
    for b in range(n_batches):
        batch_jobs = jobs[b * batch_size:(b + 1) * batch_size]
        x = x_buf[:len(batch_jobs)]
        for i, ((z, y, xx), flip) in enumerate(batch_jobs):
            t = fetch(z, y, xx)
            x[i, ..., 0] = np.flip(t, flip) if flip else t
        y_pred = np.asarray(net.predict_on_batch(x))[..., 0]
        del x
        for i, ((z, y, xx), flip) in enumerate(batch_jobs):
            p = np.flip(y_pred[i], flip) if flip else y_pred[i]
            kz, ky, kx = (min(t, n - o) for t, n, o in zip(tile, out_shape, (z, y, xx)))
            if kz > 0 and ky > 0 and kx > 0:  # a tile can lie wholly in the padded margin
                _blend_tile(out, p, (z, y, xx), (kz, ky, kx),
                            [weights[ax][index[ax][o]] for ax, o in enumerate((z, y, xx))], inv_n)
        del y_pred
        release_pages(out)  # a memory-mapped out: its pages stay in the file, not in this process
        report(progress, "predict", b + 1, n_batches)

    # The weight sum is separable: sum over the tile grid of products of 1-D weights.
    wsum = []
    for ax in range(3):
        acc = np.zeros(plan.shape[ax], dtype=np.float64)
        for s, w in zip(plan.starts[ax], weights[ax]):
            acc[s:s + tile[ax]] += w
        if np.any(acc <= 0):  # pragma: no cover - guaranteed by plan_tiles
            raise RuntimeError("tile plan leaves voxels uncovered")
        wsum.append((1.0 / acc).astype(np.float32)[: out_shape[ax]])

    # only where a factor differs from 1 (a product with 1.0 is exact: the same numbers, voxel by
    # voxel, as multiplying everywhere; most of the volume lies where one tile alone counts)
    runs = [_runs(f != 1.0) for f in wsum]

    def normalise(z0, z1):  # slab by slab, on the process's cores (the same products, voxel by voxel)
        sl = out[z0:z1]
        for a, b in _clip_runs(runs[0], z0, z1):
            sl[a - z0:b - z0] *= wsum[0][a:b, None, None]
        for a, b in runs[1]:
            sl[:, a:b] *= wsum[1][None, a:b, None]
        for a, b in runs[2]:
            sl[:, :, a:b] *= wsum[2][None, None, a:b]
        release_pages(out)

    slab_map(normalise, out_shape[0], _slab_rows(out_shape))
    return out


def _runs(mask: np.ndarray):
    """``[(start, stop), ...]``: the runs of True in a 1-D boolean array, in order."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _clip_runs(runs, lo: int, hi: int):
    """``runs`` cut to ``[lo, hi)`` (empty runs dropped)."""
    return [(max(a, lo), min(b, hi)) for a, b in runs if min(b, hi) > max(a, lo)]


def _blend_tile(out, p, origin, extent, axis_weights, inv_n) -> None:
    """``out[origin : origin + extent] += p * w`` with ``w`` the outer product of ``axis_weights``
    times ``inv_n``, in slabs of the tile on the process's cores: voxel by voxel the products of
    one whole-tile expression (``(wz * wy) * wx``, times ``inv_n``, times ``p``, added).

    Where a voxel's weight is exactly 0 (an axis weight 0: the halo) nothing is added (``p * 0``
    adds 0); where it is exactly 1 (every axis weight 1 and ``inv_n`` 1) ``p`` is added as it is
    (``p * 1.0`` is ``p``): the same numbers, with one pass over most of the tile instead of four
    (the weights, their product with ``p``, the sum), and none over its halo.
    """
    (z, y, x), (kz, ky, kx) = origin, extent
    wz, wy, wx = (np.asarray(w[:k], dtype=np.float32) for w, k in zip(axis_weights, extent))
    # per axis: the kept range (weight > 0) and, inside it, the range of weight 1
    kept, ones = [], []
    for w in (wz, wy, wx):
        nz = _runs(w != 0.0)
        k = (nz[0][0], nz[-1][1]) if nz else (0, 0)
        one = _runs(w == 1.0) if inv_n == 1.0 else []
        o = one[0] if len(one) == 1 and k[0] <= one[0][0] and one[0][1] <= k[1] else (k[0], k[0])
        kept.append(k)
        ones.append(o)
    (kz0, kz1), (ky0, ky1), (kx0, kx1) = kept
    (oz0, oz1), (oy0, oy1), (ox0, ox1) = ones

    def weighted(zs, ys, xs):
        if zs[1] <= zs[0] or ys[1] <= ys[0] or xs[1] <= xs[0]:
            return
        a, b, c = (slice(*r) for r in (zs, ys, xs))
        w = wz[a, None, None] * wy[None, b, None] * wx[None, None, c]
        w *= inv_n
        out[z + a.start:z + a.stop, y + b.start:y + b.stop, x + c.start:x + c.stop] += p[a, b, c] * w

    def add(a0, a1):
        za, zb = max(a0, kz0), min(a1, kz1)
        if zb <= za:
            return
        oa, ob = max(za, oz0), min(zb, oz1)  # planes of weight 1 in z within this slab
        if ob <= oa:
            weighted((za, zb), (ky0, ky1), (kx0, kx1))
            return
        weighted((za, oa), (ky0, ky1), (kx0, kx1))
        weighted((ob, zb), (ky0, ky1), (kx0, kx1))
        weighted((oa, ob), (ky0, oy0), (kx0, kx1))
        weighted((oa, ob), (oy1, ky1), (kx0, kx1))
        weighted((oa, ob), (oy0, oy1), (kx0, ox0))
        weighted((oa, ob), (oy0, oy1), (ox1, kx1))
        if oy1 > oy0 and ox1 > ox0:
            out[z + oa:z + ob, y + oy0:y + oy1, x + ox0:x + ox1] += p[oa:ob, oy0:oy1, ox0:ox1]

    slab_map(add, kz, kz)
