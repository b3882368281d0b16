"""napari writers: vesicle labels / images to MRC, the vesicle table to CSV, STAR and IMOD.

napari calls a single-layer writer as ``writer(path, data, attributes) -> [written paths]``;
``attributes`` is the layer state (``scale``, ``metadata``, ``features``, ``size`` ...).
Every format is written by :func:`cryoves.export.write_format` (the same code as the command
line and the Export widget: atomic writes, voxel size in the header).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cryoves.export import write_format
from cryoves.napari._layers import SHAPE_KEY, VOXEL_KEY, table_from_points, voxel_size_of

__all__ = ["write_labels_mrc", "write_image_mrc", "write_vesicles_csv", "write_vesicles_star",
           "write_vesicles_imod"]


def _voxel_size(attributes: dict[str, Any]) -> float | None:
    """The layer's voxel size (nm) as :func:`cryoves.napari._layers.voxel_size_of` reads it."""
    layer = SimpleNamespace(metadata=attributes.get("metadata") or {}, scale=attributes.get("scale", [1.0]))
    return voxel_size_of(layer)


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
    path = _with_ext(path, ".mrc")
    write_format("labels", path, None, labels=np.asarray(data), voxel_size=_require_vs(attributes),
                 overwrite=True)
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
    path = _with_ext(path, ".csv")
    write_format("csv", path, _table(data, attributes), overwrite=True)
    return [path]


def write_vesicles_star(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a vesicles Points layer to a RELION-style STAR file (accepted vesicles)."""
    path = _with_ext(path, ".star")
    write_format("star", path, _table(data, attributes), overwrite=True)
    return [path]


def write_vesicles_imod(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a vesicles Points layer to an IMOD model (``.mod``), one sphere per vesicle."""
    path = _with_ext(path, ".mod")
    meta = attributes.get("metadata") or {}
    shape = meta.get(SHAPE_KEY)
    if shape is None:
        raise ValueError("the IMOD model needs the tomogram's shape, which this layer does not record; "
                         "use the cryoves Export widget with the tomogram open")
    write_format("mod", path, _table(data, attributes), shape=tuple(shape), overwrite=True)
    return [path]
