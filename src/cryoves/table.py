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
reviewed : str
    Verdict of a human review (:class:`cryoves.edit.VesicleEditor`): ``""`` (not reviewed),
    ``"accepted"`` or ``"rejected"``.

Rows are addressed by their stable ``id`` in the row-level operations (:meth:`VesicleTable.add_row`,
:meth:`~VesicleTable.update_row`, :meth:`~VesicleTable.set_status`, :meth:`~VesicleTable.row_index_of`,
:meth:`~VesicleTable.row`); none of them renumbers.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["VesicleTable", "render_labels", "check_voxel_size", "COLUMNS", "STATUSES", "REVIEW_VERDICTS"]

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
    "reviewed": object,
}
_DEFAULTS = {
    "thickness": np.nan,
    "density": np.nan,
    "pvalue": np.nan,
    "stage": "",
    "status": "accepted",
    "note": "",
    "reviewed": "",
}
STATUSES = ("accepted", "removed")
#: Values of the ``reviewed`` column ("" = not reviewed yet).
REVIEW_VERDICTS = ("", "accepted", "rejected")
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


def _as_id(vesicle_id) -> int:
    if isinstance(vesicle_id, (bool, np.bool_)) or not isinstance(vesicle_id, (int, np.integer)):
        try:
            f = float(vesicle_id)
        except (TypeError, ValueError):
            raise TypeError(f"a vesicle id must be an integer, got {vesicle_id!r}") from None
        if not f.is_integer() or isinstance(vesicle_id, (bool, np.bool_)):
            raise TypeError(f"a vesicle id must be an integer, got {vesicle_id!r}")
        return int(f)
    return int(vesicle_id)


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def _check_row(values: Mapping) -> dict:
    """Validate and convert the values of one row (column name -> scalar)."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown vesicle-table columns: {sorted(unknown)}; known: {list(COLUMNS)}")
    out = {}
    for name, v in values.items():
        dtype = COLUMNS[name]
        if name == "id":
            out[name] = _as_id(v)
        elif dtype is object:
            out[name] = "" if v is None else str(v)
        else:
            try:
                out[name] = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"column {name!r} takes a number, got {v!r}") from None
    if "status" in out and out["status"] not in STATUSES:
        raise ValueError(f"invalid status {out['status']!r}; allowed: {STATUSES}")
    if "reviewed" in out and out["reviewed"] not in REVIEW_VERDICTS:
        raise ValueError(f"invalid reviewed value {out['reviewed']!r}; allowed: {REVIEW_VERDICTS}")
    return out


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
        bad = set(np.unique(cols["reviewed"])) - set(REVIEW_VERDICTS) if n else set()
        if bad:
            raise ValueError(f"invalid reviewed values {sorted(bad)}; allowed: {REVIEW_VERDICTS}")
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
        if name == "reviewed" and len(arr) and set(np.unique(arr)) - set(REVIEW_VERDICTS):
            raise ValueError(f"invalid reviewed values; allowed: {REVIEW_VERDICTS}")
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
            yield {name: _scalar(self._cols[name][i]) for name in COLUMNS}

    def to_dict(self, nm: bool = True) -> dict[str, np.ndarray]:
        """Columns as a dict (copies); with ``nm=True`` adds ``<col>_nm`` and ``voxel_size_nm``."""
        out = {name: arr.copy() for name, arr in self._cols.items()}
        if nm and self.voxel_size is not None:
            for name in _LENGTH_COLUMNS:
                out[f"{name}_nm"] = self.nm(name)
            out["voxel_size_nm"] = np.full(len(self), self.voxel_size)
        return out

    # -- row-level operations (rows addressed by stable id; nothing is renumbered) -------
    def row_index_of(self, vesicle_id) -> int:
        """Row index of the vesicle with id ``vesicle_id`` (KeyError if absent)."""
        idx = np.flatnonzero(self._cols["id"] == _as_id(vesicle_id))
        if len(idx) == 0:
            raise KeyError(f"no vesicle with id {vesicle_id} in the table")
        if len(idx) > 1:
            raise ValueError(f"vesicle id {vesicle_id} occurs {len(idx)} times in the table; "
                             f"make the ids unique first (VesicleTable.renumbered)")
        return int(idx[0])

    def has_id(self, vesicle_id) -> bool:
        """True if a row (of any status) has id ``vesicle_id``."""
        return bool(np.any(self._cols["id"] == _as_id(vesicle_id)))

    def row(self, vesicle_id) -> dict:
        """The row of vesicle ``vesicle_id`` as a dict of Python scalars (every column)."""
        i = self.row_index_of(vesicle_id)
        return {name: _scalar(self._cols[name][i]) for name in COLUMNS}

    def add_row(self, values: Mapping | None = None, /, **kw) -> int:
        """Append one row and return its id.

        ``z, y, x, radius`` are required; other columns take their defaults. Without an ``id``
        the row gets :meth:`next_id`; an id already in the table is refused (ids are unique and
        never reused for another vesicle while its row exists).

        Examples
        --------
        >>> t = VesicleTable.empty(voxel_size=1.0)
        >>> t.add_row(z=5, y=6, x=7, radius=4, stage="editor"), t.add_row(z=9, y=9, x=9, radius=3)
        (1, 2)
        """
        row = _check_row({**(values or {}), **kw})
        missing = [n for n in ("z", "y", "x", "radius") if n not in row]
        if missing:
            raise ValueError(f"add_row needs column(s) {missing}")
        vid = int(row.pop("id")) if "id" in row else self.next_id()
        if self.has_id(vid):
            raise ValueError(f"a vesicle with id {vid} is already in the table")
        full = {name: _DEFAULTS.get(name) for name in COLUMNS}
        full.update(row, id=vid)
        for name, dtype in COLUMNS.items():
            one = np.empty(1, dtype=dtype)
            one[0] = full[name]
            self._cols[name] = np.concatenate([self._cols[name], one])
        return vid

    def update_row(self, vesicle_id, values: Mapping | None = None, /, **kw) -> None:
        """Set some columns of the row of vesicle ``vesicle_id`` in place (the id cannot change)."""
        row = _check_row({**(values or {}), **kw})
        if "id" in row and int(row["id"]) != _as_id(vesicle_id):
            raise ValueError(f"update_row cannot change the id of vesicle {vesicle_id} (ids are stable)")
        i = self.row_index_of(vesicle_id)
        for name, v in row.items():
            self._cols[name][i] = v

    def set_status(self, vesicle_id, status: str, note: str | None = None) -> None:
        """Set the ``status`` (and optionally the ``note``) of vesicle ``vesicle_id``."""
        self.update_row(vesicle_id, status=status, **({} if note is None else {"note": note}))

    def drop_row(self, vesicle_id) -> dict:
        """Delete the row of vesicle ``vesicle_id`` entirely and return it (as :meth:`row`).

        Only for undoing an addition: a vesicle removed from the result keeps its row with
        status ``"removed"`` (:meth:`set_status`). The other rows keep their order and ids.
        """
        i = self.row_index_of(vesicle_id)
        out = {name: _scalar(self._cols[name][i]) for name in COLUMNS}
        for name in COLUMNS:
            self._cols[name] = np.delete(self._cols[name], i)
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


def sphere_bounds(centers: np.ndarray, radii: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sphere: valid flag and the clipped voxel bounds ``[lo, hi)`` of its bounding box."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(radii) & (radii > 0) & np.all(np.isfinite(centers), axis=1)
    c = np.where(ok[:, None], centers, 0.0)
    r = np.where(ok, radii, 0.0)[:, None]
    lo = np.maximum(np.floor(c - r).astype(np.int64), 0)
    hi = np.minimum(np.ceil(c + r).astype(np.int64) + 1, np.asarray(shape, dtype=np.int64))
    ok &= np.all(hi > lo, axis=1)
    return ok, lo, hi


def _render_region(label_values, centers, radii, shape, lo_r, hi_r, dtype) -> np.ndarray:
    """Labels of the region ``[lo_r, hi_r)`` of a volume of ``shape`` (see :func:`render_labels`)."""
    lo_r = np.asarray(lo_r, dtype=np.int64)
    hi_r = np.asarray(hi_r, dtype=np.int64)
    out = np.zeros(tuple(hi_r - lo_r), dtype=dtype)
    ok, lo, hi = sphere_bounds(centers, radii, shape)
    lo = np.maximum(lo, lo_r)
    hi = np.minimum(hi, hi_r)
    ok &= np.all(hi > lo, axis=1)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return out
    best = np.full(out.shape, np.inf, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    for k in idx:  # row order: the same voxel values whatever the region
        a, b, c, r = lo[k], hi[k], centers[k], radii[k]
        zz, yy, xx = np.ogrid[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        rel = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / r
        box = tuple(slice(int(p - q), int(e - q)) for p, e, q in zip(a, b, lo_r))
        take = (rel <= 1.0) & (rel < best[box])
        best[box][take] = rel[take]
        out[box][take] = label_values[k]
    return out


def _region_bounds(region, shape) -> tuple[np.ndarray, np.ndarray]:
    if len(region) != 3:
        raise ValueError(f"region must be 3 slices (Z, Y, X), got {region!r}")
    lo, hi = [], []
    for sl, n in zip(region, shape):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise ValueError(f"region must be 3 slices with step 1, got {region!r}")
        a, b, _ = sl.indices(n)
        lo.append(a)
        hi.append(max(a, b))
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def render_labels(table: VesicleTable, shape: Sequence[int], *, accepted_only: bool = True,
                  ids: np.ndarray | None = None, dtype=np.uint16, region=None) -> np.ndarray:
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
    region : tuple of 3 slices, optional
        Render only this region of the volume (returns an array of the region's shape, equal to
        ``render_labels(table, shape)[region]``; this is how the editor repaints one sphere's box).

    Returns
    -------
    labels : ndarray of ``dtype``
        0 = background. Where spheres overlap, a voxel goes to the sphere whose surface
        is relatively farthest (smallest distance / radius), so touching vesicles split
        along the plane between them; on a tie the earlier row wins. The label of a voxel
        depends only on the spheres that contain it, so any region renders the same values.
        Large volumes are rendered slab by slab (bounded extra memory).
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
    if region is not None:
        lo, hi = _region_bounds(region, shape)
        return _render_region(label_values, centers, radii, shape, lo, hi, dtype)
    labels = np.zeros(shape, dtype=dtype)
    slab = max(1, int(2 ** 24 // max(1, shape[1] * shape[2])))
    for z0 in range(0, shape[0], slab):
        z1 = min(shape[0], z0 + slab)
        labels[z0:z1] = _render_region(label_values, centers, radii, shape, (z0, 0, 0), (z1, shape[1], shape[2]),
                                       dtype)
    return labels
