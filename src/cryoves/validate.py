"""One validation layer for the API, the command line and the napari plugin.

Inputs (before any heavy work)
------------------------------
- :func:`check_voxel_size`: a finite, positive number of nm inside the plausible range of
  cryo-electron tomography (:data:`VOXEL_SIZE_RANGE_NM`), with a "Did you give Å?" hint. The
  ``name`` argument is what the message calls the value (``voxel_size`` in Python,
  ``--voxel-size`` on the command line).
- :func:`check_shape`: 3-D, and no axis thinner than the smallest vesicle (refused: nothing can
  be found); an axis thinner than the network's field of view is a warning (the network sees
  mirrored data near those faces).
- :func:`check_dtype` and :func:`check_finite`: real numbers, no NaN/Inf, not constant (one
  pass, slab by slab, no volume-sized temporary).
- :func:`check_inputs` runs them all; :func:`cryoves.pipeline.segment` calls it first.

Results (after segmentation)
----------------------------
:func:`check_result` flags implausible results: contrast polarity (membranes should be darker
than the lumen and the cytosol around each vesicle; if they are brighter the data look
inverted), centres outside the volume, radii outside the expected range. It returns
warnings (strings), which go to the run record, the CLI summary and napari notifications.

This module imports neither TensorFlow nor Qt.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import numpy as np

from cryoves.table import VesicleTable, check_voxel_size as _check_number

__all__ = ["ResultWarning", "InputWarning", "INVERT_HINT", "INVERTED_PEAK_RATIO", "VOXEL_SIZE_RANGE_NM", "EXPECTED_RADIUS_NM", "check_voxel_size", "check_shape", "check_dtype",
           "check_finite", "check_inputs", "check_result", "contrast_polarity", "default_field_of_view"]

#: Plausible voxel sizes (nm) of a cryo-electron tomogram.
VOXEL_SIZE_RANGE_NM = (0.2, 5.0)
#: Outer radii (nm) expected of synaptic vesicles (diameters about 24-100 nm). Accepted vesicles
#: outside this range are reported by :func:`check_result`.
EXPECTED_RADIUS_NM = (12.0, 50.0)
#: Default smallest vesicle radius (nm), as ``SegmentParams.min_radius_nm`` (the paper's 12 nm).
_DEFAULT_MIN_RADIUS_NM = 12.0
_SLAB_BYTES = 64 * 2 ** 20
#: :func:`check_result` calls data inverted only when the median bright peak of the vesicles'
#: radial profiles exceeds their median dark dip by this factor (and most vesicles' peak exceeds
#: their dip). Measured on the 19 simulated tomograms of both evaluation suites with their true
#: spheres: inverted, the ratio was 1.32-2.1; as they are, 0.39-0.76 at 1.2-2.8 nm voxels, but
#: 1.03 at 1.0 nm (uncorrected CTF at -8 um: the bright Fresnel fringes beside a membrane are
#: resolved and as strong as its dip), where 64 % of the vesicles looked "bright" and the data
#: were wrongly called inverted. At such sampling the profile cannot tell the contrast; no
#: warning is then better than a wrong one.
INVERTED_PEAK_RATIO = 1.15

#: What :func:`check_result` tells the user to do about data that look inverted.
INVERT_HINT = "pass --invert (command line) or negate the tomogram"


class InputWarning(UserWarning):
    """An input that can be segmented but may give poorer results (e.g. a thin volume)."""


class ResultWarning(UserWarning):
    """A segmentation result that looks implausible (see :func:`check_result`)."""


def check_voxel_size(value, *, name: str = "voxel_size") -> float:
    """Return ``value`` as a voxel size in nm, or raise a one-line error naming ``name``.

    Parameters
    ----------
    value : float
        Voxel size in nm.
    name : str
        What the message calls the value (``"voxel_size"``, ``"--voxel-size"``).

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        NaN, infinite, zero or negative, or outside :data:`VOXEL_SIZE_RANGE_NM` (with a hint
        when the value looks like Å).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number of nm, got {value!r}")
    try:
        vs = _check_number(value)
    except (TypeError, ValueError):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number of nm, got {value!r}") from None
        what = "not a number" if math.isnan(v) else "infinite" if math.isinf(v) else "not positive"
        raise ValueError(f"{name} must be a positive, finite number of nm, got {value!r} ({what})") from None
    lo, hi = VOXEL_SIZE_RANGE_NM
    if not lo <= vs <= hi:
        hint = f" Did you give Å? {vs:g} Å = {vs / 10:g} nm." if lo <= vs / 10 <= hi else ""
        raise ValueError(f"{name}={vs:g} nm is implausible for a cryo-electron tomogram "
                         f"(expected {lo}-{hi} nm).{hint}")
    return vs


def default_field_of_view() -> int:
    """Width (voxels, on the network's grid) of the receptive field of the default U-Net."""
    from cryoves.model import receptive_field  # no TensorFlow import

    return int(receptive_field()[0])


def _field_of_view(model) -> tuple[int, float | None]:
    """(receptive-field width in network voxels, the network's voxel size in nm or None)."""
    rf = getattr(model, "receptive_field", None)
    card = getattr(model, "card", None)
    if rf is not None and not callable(rf):
        try:
            return int(rf[0]), float(getattr(card, "voxel_size_nm", None) or 0) or None
        except (TypeError, ValueError, IndexError):
            pass
    return default_field_of_view(), None


def check_shape(shape: Sequence[int], voxel_size: float, *, min_radius_nm: float = _DEFAULT_MIN_RADIUS_NM,
                field_of_view: int | None = None, model_voxel_size: float | None = None,
                name: str = "tomogram") -> list[str]:
    """Refuse a volume too thin to hold a vesicle; warn when it is thinner than the network sees.

    Parameters
    ----------
    shape : (Z, Y, X)
    voxel_size : float
        nm.
    min_radius_nm : float
        Smallest vesicle radius searched for (nm).
    field_of_view : int, optional
        Receptive-field width of the network in its voxels (default: the default U-Net's).
    model_voxel_size : float, optional
        The network's voxel size (nm; default: ``voxel_size``, i.e. no resampling).
    name : str
        What messages call the volume (e.g. its file name).

    Returns
    -------
    list of str
        Warnings (empty when the volume is fine).

    Raises
    ------
    ValueError
        Not 3-D, empty, or an axis shorter than the diameter of the smallest vesicle.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"{name} must be a 3-D (Z, Y, X) volume, got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"{name} is empty (shape {shape})")
    vs = float(voxel_size)
    diameter_vox = 2.0 * float(min_radius_nm) / vs
    axes = "ZYX"
    thin = [(axes[i], s) for i, s in enumerate(shape) if s < diameter_vox]
    if thin:
        ax, s = min(thin, key=lambda t: t[1])
        raise ValueError(
            f"{name} is {s} voxels ({s * vs:.3g} nm) thick along {ax}, thinner than the smallest vesicle "
            f"searched for ({2 * min_radius_nm:g} nm diameter = {diameter_vox:.1f} voxels at {vs:g} nm): "
            f"no vesicle fits; check the voxel size or give the whole tomogram")
    fov = default_field_of_view() if field_of_view is None else int(field_of_view)
    mvs = vs if model_voxel_size is None else float(model_voxel_size)
    fov_vox = fov * mvs / vs  # the field of view on the tomogram's grid
    warns = []
    narrow = [(axes[i], s) for i, s in enumerate(shape) if s < fov_vox]
    if narrow:
        ax, s = min(narrow, key=lambda t: t[1])
        warns.append(f"{name} is {s} voxels thick along {ax}, less than the network's field of view "
                     f"({fov_vox:.0f} voxels = {fov_vox * vs:.0f} nm): it sees mirrored data near those faces, "
                     f"so vesicles there may be missed")
    return warns


def check_dtype(data, *, name: str = "tomogram") -> None:
    """Raise :class:`TypeError` unless ``data`` holds real numbers (bool, integers, floats)."""
    dt = np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
    if dt.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {dt}")


def _slabs(shape, itemsize: int = 4, slab_bytes: int = _SLAB_BYTES) -> Iterator[slice]:
    per_slice = max(1, int(np.prod(shape[1:])) * itemsize)
    step = max(1, int(slab_bytes) // per_slice)
    for z0 in range(0, shape[0], step):
        yield slice(z0, min(z0 + step, shape[0]))


def check_finite(data, *, name: str = "tomogram", slab_bytes: int = _SLAB_BYTES) -> None:
    """Raise :class:`ValueError` if ``data`` holds NaN/Inf voxels or is constant.

    One pass over the volume, slab by slab of ``slab_bytes`` (works on memory maps without
    loading them). The message gives the number of bad voxels and the first Z slice holding one.
    """
    n_bad = 0
    first_bad = None
    lo, hi = np.inf, -np.inf
    floating = np.dtype(data.dtype).kind == "f"
    for sl in _slabs(data.shape, max(4, np.dtype(data.dtype).itemsize), slab_bytes):
        slab = np.asarray(data[sl])
        if floating:
            finite = np.isfinite(slab)
            bad = finite.size - int(np.count_nonzero(finite))
        else:
            bad = 0
        if bad:
            n_bad += bad
            if first_bad is None:
                per_z = np.count_nonzero(~finite.reshape(finite.shape[0], -1), axis=1)
                first_bad = sl.start + int(np.flatnonzero(per_z)[0])
            vals = slab[finite]
            if vals.size:
                lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
        elif slab.size:
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if n_bad:
        raise ValueError(f"{name}: {n_bad} of {data.size} voxels are NaN or infinite (first in Z slice "
                         f"{first_bad}, counting from 0); the reconstruction is broken there. Fix or "
                         f"crop the tomogram (e.g. IMOD's trimvol) and try again.")
    if not hi > lo:
        raise ValueError(f"{name}: every voxel has the same value ({lo:g}); there is nothing to segment")


def check_inputs(tomogram, voxel_size, *, params=None, model=None, predict: bool = True, finite: bool = True,
                 name: str = "tomogram", voxel_size_name: str = "voxel_size", warn: bool = False) -> list[str]:
    """Every check of a segmentation's inputs, cheapest first; returns warnings.

    Parameters
    ----------
    tomogram : ndarray (Z, Y, X)
    voxel_size : float
        nm.
    params : SegmentParams, optional
        Its ``min_radius_nm`` sets the thinnest acceptable volume.
    model : UNetModel, optional
        Its receptive field and voxel size set the field-of-view warning (default: the
        default U-Net's at the tomogram's voxel size).
    predict : bool
        The network will run (else no field-of-view warning).
    finite : bool
        Scan the data for NaN/Inf and constant volumes (one pass).
    name, voxel_size_name : str
        What messages call the volume and the voxel size.
    warn : bool
        Also issue each warning as an :class:`InputWarning`.

    Raises
    ------
    TypeError, ValueError
        With a one-line message naming what is wrong.
    """
    if isinstance(tomogram, (str, bytes)) or hasattr(tomogram, "__fspath__"):
        raise TypeError(f"{name} must be an array, got the path {str(tomogram)!r}; read it first with "
                        f"cryoves.io.read_tomogram(path)")
    if not hasattr(tomogram, "shape") or not hasattr(tomogram, "dtype"):
        tomogram = np.asarray(tomogram)
    check_dtype(tomogram, name=name)
    vs = check_voxel_size(voxel_size, name=voxel_size_name)
    min_r = getattr(params, "min_radius_nm", None) or _DEFAULT_MIN_RADIUS_NM
    fov, mvs = _field_of_view(model) if predict else (0, None)
    warns = check_shape(tomogram.shape, vs, min_radius_nm=min_r, field_of_view=fov, model_voxel_size=mvs,
                        name=name)
    if finite:
        check_finite(tomogram, name=name)
    if warn:
        for w in warns:
            warnings.warn(w, InputWarning, stacklevel=2)
    return warns


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------
def contrast_polarity(tomogram, table: VesicleTable, *, max_vesicles: int = 50) -> dict:
    """Is the membrane of each accepted vesicle a dark dip or a bright peak of its radial profile?

    For each accepted vesicle (at most ``max_vesicles``, evenly spread over the table) the mean
    intensity is taken in 1-voxel shells around the centre. The baseline is the mean of the
    lumen (``d < 0.5 r``) and of the cytosol outside (``1.35 r <= d <= 1.6 r``); in the band
    ``0.5 r < d < 1.35 r``, which holds the membrane even when the fitted radius is 30 % off,
    ``dip`` = baseline - lowest shell and ``peak`` = highest shell - baseline. With membranes
    darker than lumen and cytosol (the usual cryo-ET contrast) the dip is the larger; on
    inverted data the peak is (a Fresnel fringe gives a smaller opposite extreme).

    Returns
    -------
    dict
        ``n`` (vesicles measured), ``dip`` and ``peak`` (medians, in standard deviations of the
        tomogram) and ``fraction_bright`` (fraction of vesicles whose peak exceeds their dip).
    """
    acc = table.accepted()
    shape = np.array(tomogram.shape)
    step = max(1, int(round((np.prod(shape) / 2e6) ** (1 / 3))))
    sub = np.asarray(tomogram[::step, ::step, ::step], dtype=np.float64)
    sd = float(sub.std()) or 1.0
    dips, peaks, bright = [], [], []
    pick = np.unique(np.linspace(0, len(acc) - 1, min(len(acc), max_vesicles)).round().astype(int)) \
        if len(acc) else np.zeros(0, int)
    for c, r in zip(acc.centers[pick], acc.radii[pick]):
        if not (np.all(np.isfinite(c)) and np.isfinite(r) and r > 2):
            continue
        ext = 1.6 * r + 1
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = np.asarray(tomogram[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float64)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        lumen = box[d < 0.5 * r]
        outer = box[(d >= 1.35 * r) & (d <= 1.6 * r)]
        if lumen.size < 4 or outer.size < 4:
            continue
        base = 0.5 * (lumen.mean() + outer.mean())
        shells = np.floor(d).astype(int)
        band = (d > 0.5 * r) & (d < 1.35 * r)
        idx = shells[band]
        sums = np.bincount(idx, box[band])
        cnt = np.bincount(idx)
        prof = sums[cnt > 0] / cnt[cnt > 0]
        if prof.size < 2:
            continue
        dip, peak = (base - prof.min()) / sd, (prof.max() - base) / sd
        dips.append(dip)
        peaks.append(peak)
        bright.append(peak > dip)
    if not dips:
        return {"n": 0, "dip": float("nan"), "peak": float("nan"), "fraction_bright": float("nan")}
    return {"n": len(dips), "dip": float(np.median(dips)), "peak": float(np.median(peaks)),
            "fraction_bright": float(np.mean(bright))}


def check_result(tomogram, table: VesicleTable, voxel_size: float, *, params=None,
                 invert_hint: str = INVERT_HINT, warn: bool = False) -> list[str]:
    """Sanity checks of a segmentation result; returns warnings (one line each).

    - contrast polarity (:func:`contrast_polarity`): when the membrane of most accepted vesicles
      is a bright peak rather than a dark dip between lumen and cytosol, and the peaks are clearly
      the stronger (:data:`INVERTED_PEAK_RATIO`), the data look inverted (dense = bright) and the
      fits are unreliable (radii too small);
    - accepted centres outside the volume;
    - accepted radii outside :data:`EXPECTED_RADIUS_NM` (and the search range of ``params``).

    Parameters
    ----------
    tomogram : ndarray (Z, Y, X)
        The tomogram as segmented (membranes expected dark).
    table : VesicleTable
    voxel_size : float
        nm.
    params : SegmentParams, optional
    invert_hint : str
        What to tell the user to do about inverted data.
    warn : bool
        Also issue each warning as a :class:`ResultWarning`.
    """
    vs = float(voxel_size)
    acc = table.accepted()
    warns: list[str] = []
    n = len(acc)
    if n == 0:
        return warns
    shape = np.array(tomogram.shape, dtype=float)
    c = acc.centers
    outside = ~np.all((c >= -0.5) & (c <= shape - 0.5), axis=1) | ~np.all(np.isfinite(c), axis=1)
    if outside.any():
        ids = ", ".join(str(int(i)) for i in acc.ids[outside][:5]) + (", ..." if outside.sum() > 5 else "")
        warns.append(f"{int(outside.sum())} of {n} accepted vesicles have their centre outside the volume "
                     f"(ids {ids}); the volume may be too thin or cropped")
    lo, hi = EXPECTED_RADIUS_NM
    if params is not None:
        lo = min(lo, float(getattr(params, "min_radius_nm", lo)))
        hi = max(hi, float(getattr(params, "refine_max_radius_nm", hi)))
    r_nm = acc.radii * vs
    bad_r = ~((r_nm >= lo) & (r_nm <= hi))
    if bad_r.any():
        warns.append(f"{int(bad_r.sum())} of {n} accepted vesicles have a radius outside the expected "
                     f"{lo:g}-{hi:g} nm (median {np.nanmedian(r_nm):.1f} nm); check the voxel size")
    pol = contrast_polarity(tomogram, table)
    if pol["n"] >= 1 and pol["fraction_bright"] > 0.5 and pol["peak"] > INVERTED_PEAK_RATIO * pol["dip"]:
        warns.append(f"the data look inverted: the membranes of {pol['fraction_bright']:.0%} of {pol['n']} "
                     f"vesicles are brighter than their lumen and the cytosol around them (cryoves expects "
                     f"dense = dark); if your tomogram has dense = bright, {invert_hint}")
    if warn:
        for w in warns:
            warnings.warn(w, ResultWarning, stacklevel=2)
    return warns
