"""napari reader for MRC tomograms (``.mrc``, ``.rec``, ``.map``, ``.mrcs``, also ``.gz``/``.bz2``).

The voxel size in the MRC header (Å) becomes the layer ``scale`` in nm (``units = "nm"``)
and ``metadata["voxel_size_nm"]``. Files are opened memory-mapped by
:func:`cryoves.io.read_tomogram`; the display range is computed from a few planes only,
so even a multi-GB tomogram opens without reading it whole.

Files whose name says they hold labels (``*label*``, ``*labels*``, ``*mask*``, ``*seg*``)
and that store integers open as a Labels layer (e.g. the vesicle labels written by cryoves).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cryoves.napari._layers import image_kwargs, labels_kwargs

__all__ = ["napari_get_reader", "read_mrc", "EXTENSIONS"]

EXTENSIONS = (".mrc", ".rec", ".map", ".mrcs")
COMPRESSION = ("", ".gz", ".bz2")
_LABEL_NAME = re.compile(r"(label|mask|seg)", re.IGNORECASE)


def _is_mrc(path) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    name = str(path).lower()
    return any(name.endswith(ext + comp) for ext in EXTENSIONS for comp in COMPRESSION)


def _layer_name(path: Path) -> str:
    name = path.name
    for comp in COMPRESSION[1:]:
        if name.lower().endswith(comp):
            name = name[: -len(comp)]
    return Path(name).stem


def _readable_volume(path) -> bool:
    """True if ``path`` is an MRC file whose header :mod:`cryoves.io` reads and that holds 3-D data."""
    from cryoves.io import read_mrc_header

    try:
        p = Path(path)
        if not p.is_file() or p.stat().st_size == 0:
            return False
        return len(read_mrc_header(p).shape) == 3
    except (OSError, ValueError, TypeError):
        return False


def napari_get_reader(path):
    """Return :func:`read_mrc` if ``path`` (or every path of a list) is a readable 3-D MRC file, else None.

    The name must end like an MRC file and the header must read as 3-D data (napari's
    convention: a reader returns None for what it cannot read, so that another reader can try;
    a text file, a PNG, an empty file, a 2-D image or a folder named ``*.mrc`` get None).

    Parameters
    ----------
    path : str or list of str
        What the user asked napari to open.

    Returns
    -------
    callable or None
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_is_mrc(p) and _readable_volume(p) for p in paths):
        return None
    return read_mrc


#: Files larger than this (as float32) that are not stored as float32 open lazily (dask):
#: converting them whole would freeze the viewer.
LAZY_BYTES = 256 * 1024**2


def _looks_like_labels(path: Path) -> bool:
    if not _LABEL_NAME.search(_layer_name(path)):
        return False
    from cryoves.io import read_mrc_header

    try:
        info = read_mrc_header(path)
    except Exception:  # unreadable header: let read_tomogram report it properly
        return False
    return np.dtype(info.dtype).kind in "iu"


def _lazy_volume(path: Path):
    """A lazily converted (float32, plane by plane) view of a large integer MRC, or None."""
    from cryoves import io

    info = io.read_mrc_header(path)
    if (info.compressed is not None or len(info.shape) != 3 or tuple(info.axis_order) != (1, 2, 3)
            or (np.dtype(info.dtype) == np.float32 and np.dtype(info.dtype).isnative)
            or int(np.prod(info.shape)) * 4 < LAZY_BYTES):
        return None
    import dask.array as da

    raw = np.memmap(path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=tuple(info.shape))
    data = da.from_array(raw, chunks=(1,) + tuple(info.shape[1:])).astype(np.float32)
    vs = io.voxel_size_from_header(info)
    io.protect_path(path)
    return data, vs


def _open_tomogram(path: Path):
    """(data, voxel size or None, message or None) for a tomogram file."""
    import warnings

    from cryoves.io import read_tomogram

    try:
        lazy = _lazy_volume(path)
        if lazy is not None:
            return lazy[0], lazy[1], None
    except ValueError:
        pass  # e.g. no voxel size in the header: handled below
    try:
        data, vs = read_tomogram(path, mmap=True, check=False)
        return data, vs, None
    except ValueError as err:
        if "voxel" not in str(err).lower():
            raise
        msg = str(err).split(" Pass the voxel size")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, _ = read_tomogram(path, voxel_size=1.0, mmap=True, check=False)
    return data, None, (f"{msg}. Enter the voxel size (nm) in the cryoves Predict or "
                        "Find vesicles widget before running anything.")


def read_mrc(path) -> list[tuple]:
    """Read one or more MRC files into napari layer-data tuples.

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of (data, kwargs, layer_type)
        One Image layer per tomogram (scale = voxel size in nm, memory-mapped or lazy) or one
        Labels layer per integer label file.
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        p = Path(p)
        name = _layer_name(p)
        if _looks_like_labels(p):
            from cryoves.io import read_labels

            data, vs = read_labels(p)
            layers.append((data, labels_kwargs(vs, name, "labels_file", name), "labels"))
            continue
        data, vs, msg = _open_tomogram(p)
        if msg:
            from napari.utils.notifications import show_warning

            show_warning(f"cryoves: {msg}")
        kw = image_kwargs(vs, name, role="tomogram", data=data)
        kw["metadata"]["cryoves_source"] = str(p)
        layers.append((data, kw, "image"))
    return layers
