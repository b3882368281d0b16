"""napari writers: vesicle labels / images to MRC, the vesicle table to CSV, STAR and IMOD.

napari calls a single-layer writer as ``writer(path, data, attributes) -> [written paths]``;
``attributes`` is the layer state (``scale``, ``metadata``, ``features``, ``size`` ...).
All writing is done by :mod:`cryoves.io` (atomic writes, voxel size in the header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryoves.napari._layers import SHAPE_KEY, VOXEL_KEY, table_from_points

__all__ = ["write_labels_mrc", "write_image_mrc", "write_vesicles_csv", "write_vesicles_star",
           "write_vesicles_imod"]


def _voxel_size(attributes: dict[str, Any]) -> float | None:
    meta = attributes.get("metadata") or {}
    vs = meta.get(VOXEL_KEY)
    if vs:
        return float(vs)
    scale = np.asarray(attributes.get("scale", [1.0]), dtype=float)
    if len(scale) and np.allclose(scale, scale[-1]) and not np.isclose(scale[-1], 1.0):
        return float(scale[-1])
    return None


def _require_vs(attributes) -> float:
    vs = _voxel_size(attributes)
    if vs is None:
        raise ValueError("the layer's voxel size is unknown (metadata 'voxel_size_nm' or an isotropic "
                         "scale in nm); set the layer scale to the voxel size first")
    return vs


def _with_ext(path: str, ext: str) -> str:
    p = Path(path)
    return str(p if p.suffix.lower() == ext else p.with_name(p.name + ext))


def write_labels_mrc(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Labels layer to an MRC file (uint16, voxel size from the layer kept).

    Parameters
    ----------
    path : str
        Destination (``.mrc``).
    data : ndarray
        The label volume (Z, Y, X).
    attributes : dict
        Layer attributes from napari.

    Returns
    -------
    list of str
        The written path.
    """
    from cryoves.io import write_labels_mrc as _write

    path = _with_ext(path, ".mrc")
    _write(path, np.asarray(data), _require_vs(attributes), overwrite=True)
    return [path]


def write_image_mrc(path: str, data: Any, attributes: dict) -> list[str]:
    """Write an Image layer (tomogram, probability map) to a float32 MRC file with its voxel size."""
    from cryoves.io import write_mrc

    path = _with_ext(path, ".mrc")
    write_mrc(path, np.asarray(data, dtype=np.float32), _require_vs(attributes), overwrite=True)
    return [path]


def _table(data, attributes):
    meta = dict(attributes.get("metadata") or {})
    if VOXEL_KEY not in meta or meta[VOXEL_KEY] is None:
        meta[VOXEL_KEY] = _voxel_size(attributes)
    return table_from_points(data, features=attributes.get("features"), size=attributes.get("size"),
                             metadata=meta)


def write_vesicles_csv(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a vesicles Points layer (the vesicle table) to CSV (voxels and nm columns)."""
    from cryoves.io import write_vesicles_csv as _write

    path = _with_ext(path, ".csv")
    _write(path, _table(data, attributes), overwrite=True)
    return [path]


def write_vesicles_star(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a vesicles Points layer to a RELION-style STAR file (accepted vesicles)."""
    from cryoves.io import write_star

    path = _with_ext(path, ".star")
    write_star(path, _table(data, attributes), overwrite=True)
    return [path]


def write_vesicles_imod(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a vesicles Points layer to an IMOD model (``.mod``), one sphere per vesicle."""
    from cryoves.io import write_imod_model

    path = _with_ext(path, ".mod")
    meta = attributes.get("metadata") or {}
    shape = meta.get(SHAPE_KEY)
    if shape is None:
        raise ValueError("the IMOD model needs the tomogram's shape, which this layer does not record; "
                         "use the cryoves Export widget with the tomogram open")
    write_imod_model(path, _table(data, attributes), tuple(shape), overwrite=True)
    return [path]
