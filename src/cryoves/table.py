"""The vesicle table: the canonical result of cryoves.

One row per vesicle, columns as numpy arrays. Coordinates and lengths are stored in
voxels of the tomogram the table belongs to (``z, y, x, radius, thickness``); the table
carries that tomogram's ``voxel_size`` (nm) so nm values are always derivable
(:meth:`VesicleTable.nm`). Label volumes are rendered from the table
(:func:`render_labels`), never the other way round.

Columns
-------
id : int
    Stable identifier (>= 1). Renumbering is explicit (:meth:`VesicleTable.renumbered`).
z, y, x : float
    Sphere centre, voxels, on the tomogram's grid (array index order).
radius : float
    Outer radius of the vesicle (outer edge of the membrane), voxels.
thickness : float
    Membrane thickness t_m, voxels (NaN if not measured).
density : float
    Mean radial-profile intensity over the membrane, rho (NaN if not measured), in
    units of the normalised tomogram (see :mod:`cryoves.refine`).
pvalue : float
    Mahalanobis outlier p-value (NaN if not computed).
stage : str
    Provenance: the stage that produced or last changed the row (``"global"``,
    ``"adaptive"``, ``"refine"``, ``"outliers"``, ``"editor"``, ``"truth"``, ``"import"``).
status : str
    ``"accepted"`` (part of the result) or ``"removed"`` (kept for review only).
note : str
    Free text; why a row was removed, e.g. ``"outlier p=0.012"``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["VesicleTable", "render_labels", "check_voxel_size", "COLUMNS", "STATUSES"]

#: Column name -> numpy dtype, in canonical order.
COLUMNS: dict[str, object] = {
    "id": np.int64,
    "z": np.float64,
    "y": np.float64,
    "x": np.float64,
    "radius": np.float64,
    "thickness": np.float64,
    "density": np.float64,
    "pvalue": np.float64,
    "stage": object,
    "status": object,
    "note": object,
}
_DEFAULTS = {
    "thickness": np.nan,
    "density": np.nan,
    "pvalue": np.nan,
    "stage": "",
    "status": "accepted",
    "note": "",
}
STATUSES = ("accepted", "removed")
_LENGTH_COLUMNS = ("z", "y", "x", "radius", "thickness")


def check_voxel_size(voxel_size) -> float:
    """Return ``voxel_size`` as a float number of nm, or raise a clear TypeError/ValueError."""
    try:
        v = float(voxel_size)
    except (TypeError, ValueError):
        raise TypeError(f"voxel_size must be a number of nm, got {voxel_size!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"voxel_size must be a positive number of nm, got {voxel_size!r}")
    return v


def _as_column(name: str, values, n: int) -> np.ndarray:
    dtype = COLUMNS[name]
    if np.isscalar(values) or values is None:
        fill = _DEFAULTS.get(name, values) if values is None else values
        arr = np.empty(n, dtype=dtype)
        arr[...] = fill
        return arr
    if dtype is object:
        arr = np.empty(len(values), dtype=object)
        arr[:] = [str(v) for v in values]
        return arr
    return np.asarray(values, dtype=dtype).reshape(-1).copy()


class VesicleTable:
    """Table of spherical vesicles (see module docstring for the columns).

    Parameters
    ----------
    columns : mapping of str to array-like, optional
        Any subset of :data:`COLUMNS`; ``z, y, x, radius`` are required when rows exist.
        Missing optional columns take their defaults, a missing ``id`` becomes 1..N.
    voxel_size : float, optional
        Voxel size of the tomogram in nm (isotropic).

    Examples
    --------
    >>> t = VesicleTable.from_arrays([[10, 20, 30]], [12.0], voxel_size=1.5)
    >>> len(t), float(t.nm("radius")[0])
    (1, 18.0)
    """

    __slots__ = ("_cols", "voxel_size")

    def __init__(self, columns: Mapping[str, Sequence] | None = None, voxel_size: float | None = None):
        columns = dict(columns or {})
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown vesicle-table columns: {sorted(unknown)}; known: {list(COLUMNS)}")
        n = 0
        for name in ("z", "y", "x", "radius", "id"):
            if name in columns and columns[name] is not None and not np.isscalar(columns[name]):
                n = len(columns[name])
                break
        cols: dict[str, np.ndarray] = {}
        for name in COLUMNS:
            if name in columns:
                cols[name] = _as_column(name, columns[name], n)
            elif name == "id":
                cols[name] = np.arange(1, n + 1, dtype=np.int64)
            elif name in _DEFAULTS:
                cols[name] = _as_column(name, None, n)
            elif n == 0:
                cols[name] = np.empty(0, dtype=COLUMNS[name])
            else:
                raise ValueError(f"vesicle table needs column {name!r}")
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"vesicle-table columns differ in length: {lengths}")
        bad = set(np.unique(cols["status"])) - set(STATUSES) if n else set()
        if bad:
            raise ValueError(f"invalid status values {sorted(bad)}; allowed: {STATUSES}")
        if voxel_size is not None:
            voxel_size = check_voxel_size(voxel_size)
        self._cols = cols
        self.voxel_size = voxel_size

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_arrays(cls, centers, radii, voxel_size: float | None = None, **columns) -> "VesicleTable":
        """Build a table from an (N, 3) array of (z, y, x) centres and N radii (voxels)."""
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
        radii = np.asarray(radii, dtype=np.float64).reshape(-1)
        if len(centers) != len(radii):
            raise ValueError(f"{len(centers)} centres but {len(radii)} radii")
        cols = {"z": centers[:, 0], "y": centers[:, 1], "x": centers[:, 2], "radius": radii}
        cols.update(columns)
        return cls(cols, voxel_size=voxel_size)

    @classmethod
    def empty(cls, voxel_size: float | None = None) -> "VesicleTable":
        return cls({}, voxel_size=voxel_size)

    @classmethod
    def concat(cls, tables: Iterable["VesicleTable"]) -> "VesicleTable":
        """Stack tables (same voxel size) row-wise; ids are kept as they are."""
        tables = list(tables)
        if not tables:
            return cls.empty()
        sizes = {t.voxel_size for t in tables}
        if len(sizes) > 1:
            raise ValueError(f"cannot concatenate tables with different voxel sizes {sizes}")
        cols = {name: np.concatenate([t._cols[name] for t in tables]) for name in COLUMNS}
        return cls(cols, voxel_size=tables[0].voxel_size)

    # -- access -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._cols["id"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._cols[name]

    def __setitem__(self, name: str, values) -> None:
        if name not in COLUMNS:
            raise KeyError(f"unknown column {name!r}")
        arr = _as_column(name, values, len(self))
        if len(arr) != len(self):
            raise ValueError(f"column {name!r} has {len(arr)} values for {len(self)} rows")
        if name == "status" and len(arr) and set(np.unique(arr)) - set(STATUSES):
            raise ValueError(f"invalid status values; allowed: {STATUSES}")
        self._cols[name] = arr

    def __iter__(self):
        raise TypeError("iterate over rows with VesicleTable.rows()")

    def __repr__(self) -> str:
        n_acc = int(np.sum(self._cols["status"] == "accepted"))
        return f"VesicleTable({len(self)} vesicles, {n_acc} accepted, voxel_size={self.voxel_size})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, VesicleTable) or len(self) != len(other):
            return False
        if self.voxel_size != other.voxel_size:
            return False
        for name, dtype in COLUMNS.items():
            a, b = self._cols[name], other._cols[name]
            if dtype is object:
                if not np.array_equal(a, b):
                    return False
            elif not np.allclose(a, b, equal_nan=True, rtol=0, atol=0):
                return False
        return True

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(COLUMNS)

    @property
    def centers(self) -> np.ndarray:
        """(N, 3) array of (z, y, x) centres in voxels."""
        return np.stack([self._cols["z"], self._cols["y"], self._cols["x"]], axis=1)

    @property
    def radii(self) -> np.ndarray:
        return self._cols["radius"]

    @property
    def ids(self) -> np.ndarray:
        return self._cols["id"]

    def nm(self, name: str) -> np.ndarray:
        """A length column (z, y, x, radius, thickness) in nm; needs ``voxel_size``."""
        if name not in _LENGTH_COLUMNS:
            raise KeyError(f"{name!r} is not a length column; length columns: {_LENGTH_COLUMNS}")
        if self.voxel_size is None:
            raise ValueError("this vesicle table has no voxel_size, so nm values are unknown")
        return self._cols[name] * self.voxel_size

    def rows(self):
        """Iterate over rows as dicts (slow path; for display and writers)."""
        for i in range(len(self)):
            yield {name: (self._cols[name][i].item() if hasattr(self._cols[name][i], "item") else self._cols[name][i])
                   for name in COLUMNS}

    def to_dict(self, nm: bool = True) -> dict[str, np.ndarray]:
        """Columns as a dict (copies); with ``nm=True`` adds ``<col>_nm`` and ``voxel_size_nm``."""
        out = {name: arr.copy() for name, arr in self._cols.items()}
        if nm and self.voxel_size is not None:
            for name in _LENGTH_COLUMNS:
                out[f"{name}_nm"] = self.nm(name)
            out["voxel_size_nm"] = np.full(len(self), self.voxel_size)
        return out

    # -- derived tables -----------------------------------------------------------
    def copy(self) -> "VesicleTable":
        return VesicleTable({k: v.copy() for k, v in self._cols.items()}, voxel_size=self.voxel_size)

    def select(self, index) -> "VesicleTable":
        """Rows by boolean mask or integer indices (a new table)."""
        index = np.asarray(index)
        if index.dtype == bool and len(index) != len(self):
            raise ValueError(f"boolean mask of length {len(index)} for {len(self)} rows")
        return VesicleTable({k: v[index] for k, v in self._cols.items()}, voxel_size=self.voxel_size)

    def accepted(self) -> "VesicleTable":
        """Only rows with status ``accepted``."""
        return self.select(self._cols["status"] == "accepted")

    def sorted_by(self, name: str, descending: bool = False) -> "VesicleTable":
        order = np.argsort(self._cols[name], kind="stable")
        return self.select(order[::-1] if descending else order)

    def renumbered(self, start: int = 1) -> "VesicleTable":
        """A copy with ids ``start, start+1, ...`` in row order."""
        t = self.copy()
        t._cols["id"] = np.arange(start, start + len(t), dtype=np.int64)
        return t

    def next_id(self) -> int:
        return int(self._cols["id"].max()) + 1 if len(self) else 1

    def rescaled(self, factor: float, voxel_size: float | None = None) -> "VesicleTable":
        """Lengths multiplied by ``factor`` (e.g. from a resampled grid back to the input grid).

        Centres follow the voxel-centre convention ``x_new = (x + 0.5) * factor - 0.5``.
        """
        t = self.copy()
        for name in ("z", "y", "x"):
            t._cols[name] = (t._cols[name] + 0.5) * factor - 0.5
        for name in ("radius", "thickness"):
            t._cols[name] = t._cols[name] * factor
        t.voxel_size = voxel_size if voxel_size is not None else (
            None if self.voxel_size is None else self.voxel_size / factor)
        return t


def render_labels(table: VesicleTable, shape: Sequence[int], *, accepted_only: bool = True,
                  ids: np.ndarray | None = None, dtype=np.uint16) -> np.ndarray:
    """Render the vesicles of ``table`` as filled spheres, one label per vesicle.

    Parameters
    ----------
    table : VesicleTable
    shape : (Z, Y, X)
        Output shape (the tomogram's).
    accepted_only : bool
        Skip rows whose status is not ``accepted``.
    ids : array of int, optional
        Label value per row (default: the table's ``id`` column).
    dtype : numpy dtype
        Output dtype (uint16 by default, as written to MRC).

    Returns
    -------
    labels : ndarray of ``dtype``
        0 = background. Where spheres overlap, a voxel goes to the sphere whose surface
        is relatively farthest (smallest distance / radius), so touching vesicles split
        along the plane between them.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"labels shape must be 3-D (Z, Y, X), got {shape}")
    sel = table["status"] == "accepted" if accepted_only else np.ones(len(table), bool)
    label_values = np.asarray(table.ids if ids is None else ids)[sel]
    if len(label_values) and label_values.max() > np.iinfo(dtype).max:
        raise ValueError(f"label id {label_values.max()} does not fit in {np.dtype(dtype).name}")
    centers = table.centers[sel]
    radii = table.radii[sel]
    labels = np.zeros(shape, dtype=dtype)
    best = np.full(shape, np.inf, dtype=np.float32)
    for lab, c, r in zip(label_values, centers, radii):
        if not (np.isfinite(r) and r > 0 and np.all(np.isfinite(c))):
            continue
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        rel = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / r
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        take = (rel <= 1.0) & (rel < best[box])
        best[box][take] = rel[take]
        labels[box][take] = lab
    return labels
