"""Layer conventions shared by the reader, the writers, the sample data and the widgets.

Every layer cryoves creates carries

* ``scale`` = voxel size in nm on every axis and ``units = "nm"``, so napari's scale bar,
  the cursor position and measurements are in nm while the data stay on the voxel grid;
* ``metadata["voxel_size_nm"]`` (float), ``metadata["cryoves_role"]`` (what the layer is)
  and ``metadata["cryoves_tomogram"]`` (the name of the tomogram layer it derives from).

Layer names follow one convention so that widgets chain (each widget pre-selects the
layers the previous stage wrote)::

    <tomo>                      Image   role "tomogram"
    <tomo> probability          Image   role "probability"
    <tomo> probability (large vesicles)  Image  role "probability_large" (the large-vesicle pass)
    <tomo> labels (global)      Labels  role "labels_global"
    <tomo> labels (adaptive)    Labels  role "labels_adaptive"
    <tomo> vesicles             Points  role "vesicles"   (the VesicleTable, as features)
    <tomo> vesicle labels       Labels  role "vesicle_labels" (rendered from the table)

The canonical result is the :class:`~cryoves.VesicleTable`. In napari it lives in a Points
layer: ``data`` = centres (z, y, x) in voxels, ``size`` = 2 x radius (voxels, i.e. the
sphere's diameter), ``features`` = every table column (plus ``*_nm`` columns for display),
``shown`` = status is ``accepted`` (or every row, on demand). No copy of the table is kept in
``metadata``: :func:`table_from_points` turns a (possibly edited) Points layer back into a table,
:func:`update_points` makes a layer show a new table.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from cryoves.table import COLUMNS, VesicleTable, render_labels

__all__ = [
    "VOXEL_KEY", "TABLE_KEY", "ROLE_KEY", "TOMO_KEY", "SHAPE_KEY", "SUFFIX",
    "layer_name", "base_name", "voxel_size_of", "layer_meta", "image_kwargs",
    "labels_kwargs", "points_layer_data", "update_points", "table_from_points", "table_features",
    "outline_colors", "vesicle_layers_data", "add_or_update", "set_thick_slicing", "OUTLINE_COLORS",
    "quiet_layer_list",
]

VOXEL_KEY = "voxel_size_nm"
TABLE_KEY = "cryoves_table"
ROLE_KEY = "cryoves_role"
TOMO_KEY = "cryoves_tomogram"
SHAPE_KEY = "cryoves_shape"

#: role -> layer-name suffix (appended to the tomogram layer's name).
SUFFIX = {
    "tomogram": "",
    "probability": " probability",
    "probability_large": " probability (large vesicles)",
    "labels_global": " labels (global)",
    "labels_adaptive": " labels (adaptive)",
    "vesicles": " vesicles",
    "vesicle_labels": " vesicle labels",
    "truth_labels": " truth labels",
    "truth_vesicles": " truth vesicles",
}

def layer_name(tomogram: str, role: str) -> str:
    """Name of the layer of ``role`` derived from the tomogram layer named ``tomogram``."""
    return f"{tomogram}{SUFFIX[role]}"


def base_name(layer) -> str:
    """The tomogram name a layer derives from (metadata first, then the naming convention)."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get(TOMO_KEY):
        return str(meta[TOMO_KEY])
    name = layer.name if hasattr(layer, "name") else str(layer)
    for suffix in sorted(SUFFIX.values(), key=len, reverse=True):
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def voxel_size_of(layer) -> float | None:
    """Voxel size (nm) of a layer: ``metadata["voxel_size_nm"]``, else an isotropic scale != 1.

    Returns ``None`` when unknown (no metadata and unit scale).
    """
    meta = getattr(layer, "metadata", {}) or {}
    vs = meta.get(VOXEL_KEY)
    if vs is not None and np.isfinite(float(vs)) and float(vs) > 0:
        return float(vs)
    scale = np.asarray(getattr(layer, "scale", [1.0]), dtype=float)
    if len(scale) and np.allclose(scale, scale[-1]) and not np.isclose(scale[-1], 1.0) and scale[-1] > 0:
        return float(scale[-1])
    return None


def layer_meta(voxel_size: float | None, role: str, tomogram: str, **extra) -> dict[str, Any]:
    """Metadata dictionary for a cryoves layer."""
    meta = {VOXEL_KEY: None if voxel_size is None else float(voxel_size), ROLE_KEY: role,
            TOMO_KEY: tomogram}
    meta.update(extra)
    return meta


def _spatial(voxel_size: float | None, ndim: int = 3) -> dict[str, Any]:
    vs = 1.0 if voxel_size is None else float(voxel_size)
    out: dict[str, Any] = {"scale": (vs,) * ndim}
    if voxel_size is not None:
        out["units"] = ("nm",) * ndim
    return out


def contrast_limits(data: np.ndarray, max_samples: int = 2_000_000) -> tuple[float, float]:
    """Robust display range (0.5 / 99.5 percentiles) from a strided subsample of ``data``.

    Reads only a few planes of a memory-mapped volume, so opening a large file stays fast.
    """
    data = np.asarray(data) if not hasattr(data, "shape") else data
    nz = data.shape[0]
    planes = np.unique(np.linspace(0, nz - 1, num=min(nz, 9)).astype(int))
    per_plane = max(1, max_samples // max(1, len(planes)))
    samples = []
    for z in planes:
        plane = np.asarray(data[z]).ravel()
        step = max(1, plane.size // per_plane)
        samples.append(plane[::step].astype(np.float32, copy=False))
    s = np.concatenate(samples)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(s, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(s.min()), float(s.max()) if s.max() > s.min() else float(s.min()) + 1.0
    return float(lo), float(hi)


def image_kwargs(voxel_size: float | None, name: str, role: str = "tomogram",
                 tomogram: str | None = None, data: np.ndarray | None = None, **extra) -> dict:
    """``add_image`` keyword arguments for a cryoves image layer."""
    # projection "none": a thick slice (set for the vesicle spheres) must not average the tomogram
    kw: dict[str, Any] = {"name": name, "metadata": layer_meta(voxel_size, role, tomogram or name),
                          "projection_mode": "none"}
    kw.update(_spatial(voxel_size))
    if role in ("probability", "probability_large"):
        kw.update(colormap="inferno", blending="additive", opacity=0.6, contrast_limits=(0.0, 1.0))
    else:
        kw.update(colormap="gray")
        if data is not None:
            kw["contrast_limits"] = contrast_limits(data)
    kw.update(extra)
    return kw


def labels_kwargs(voxel_size: float | None, name: str, role: str, tomogram: str, meta: dict | None = None,
                  **extra) -> dict:
    """``add_labels`` keyword arguments for a cryoves labels layer (``meta`` adds metadata)."""
    kw: dict[str, Any] = {"name": name, "metadata": layer_meta(voxel_size, role, tomogram, **(meta or {})),
                          "opacity": 0.45}
    kw.update(_spatial(voxel_size))
    kw.update(extra)
    return kw


#: Colours of the vesicle outlines by state -- readable on a grey tomogram.
#: ``accepted``: result, not yet looked at; ``reviewed``: accepted by the user in the review
#: queue; ``removed``: rejected (by the pipeline or the user), shown on demand; ``edited``: the
#: vesicles the last edit touched.
OUTLINE_COLORS = {"accepted": "#ffd700", "reviewed": "#39e639", "removed": "#ff3030", "edited": "#ff4dff"}
STATUS_COLORS = {"accepted": OUTLINE_COLORS["accepted"], "removed": OUTLINE_COLORS["removed"]}
#: Outline width of the vesicle discs in voxels (the editor keeps it a fixed number of screen pixels).
OUTLINE_VOXELS = 0.5


def table_features(table: VesicleTable):
    """The table's columns as a DataFrame for ``Points.features``, plus ``radius_nm`` / ``thickness_nm``.

    The nm values come from :meth:`VesicleTable.nm` (NaN when the voxel size is unknown).
    """
    import pandas as pd

    df = pd.DataFrame({name: table[name] for name in table.columns})
    for name in table.columns:
        if df[name].dtype == object:
            df[name] = df[name].astype(str)
    for name in ("radius", "thickness"):
        df[f"{name}_nm"] = table.nm(name) if table.voxel_size is not None else np.full(len(table), np.nan)
    return df


def outline_colors(table: VesicleTable, edited_ids=()) -> np.ndarray:
    """(N, 4) RGBA outline colour per row: accepted, reviewed (accepted in review), removed, just edited."""
    from napari.utils.colormaps.standardize_color import transform_color

    palette = {k: transform_color(v)[0] for k, v in OUTLINE_COLORS.items()}
    n = len(table)
    out = np.tile(palette["accepted"], (n, 1))
    if not n:
        return out
    if "reviewed" in table.columns:
        out[np.asarray(table["reviewed"], dtype=str) == "accepted"] = palette["reviewed"]
    removed = np.asarray(table["status"], dtype=str) == "removed"
    out[removed] = palette["removed"]
    if len(edited_ids):  # a removed vesicle stays red: "just edited" marks what is now part of the result
        out[np.isin(table.ids, np.asarray(list(edited_ids), dtype=np.int64)) & ~removed] = palette["edited"]
    return out


def _sizes(table: VesicleTable) -> np.ndarray:
    # a row without a radius (never fitted) is drawn as a 1-voxel dot; table_from_points maps it back
    return np.maximum(2.0 * np.nan_to_num(table.radii, nan=0.5), 1.0)


def points_layer_data(table: VesicleTable, tomogram: str, shape, *, name: str | None = None,
                      role: str = "vesicles", show_removed: bool = False) -> tuple:
    """A napari Points layer-data tuple ``(data, kwargs, "points")`` holding ``table``.

    The layer is a view of the table, the one adapter being :func:`points_layer_data` /
    :func:`update_points` (table -> layer) and :func:`table_from_points` (layer -> table):
    ``data`` = centres, ``size`` = 2 x radius, ``features`` = the columns. No copy of the table is
    kept in ``metadata`` (it would go stale as soon as the layer is edited).

    Parameters
    ----------
    table : VesicleTable
        The vesicles (voxels of the tomogram's grid).
    tomogram : str
        Name of the tomogram layer (for the layer name and metadata).
    shape : tuple of int
        Shape (Z, Y, X) of the tomogram, kept in metadata so labels can be rendered.
    name : str, optional
        Layer name (default ``"<tomogram> vesicles"``).
    role : str
        ``"vesicles"`` or ``"truth_vesicles"``.
    show_removed : bool
        Also show the rows whose status is ``removed`` (in red).
    """
    vs = table.voxel_size
    status = np.asarray(table["status"], dtype=str)
    kw: dict[str, Any] = {
        "name": name or layer_name(tomogram, role),
        "size": _sizes(table),
        "features": table_features(table),
        "shown": np.ones(len(table), bool) if show_removed else status == "accepted",
        "face_color": "transparent",
        "border_color": outline_colors(table) if len(table) else OUTLINE_COLORS["accepted"],
        "border_width": OUTLINE_VOXELS,
        "border_width_is_relative": False,
        "projection_mode": "rescale_spherical",
        "metadata": layer_meta(vs, role, tomogram, **{SHAPE_KEY: tuple(int(s) for s in shape)}),
        "ndim": 3,
    }
    if role == "truth_vesicles":
        kw["border_color"] = "#00e5ff"
    kw.update(_spatial(vs))
    data = table.centers if len(table) else np.empty((0, 3))
    return (data, kw, "points")


def update_points(layer, table: VesicleTable, *, edited_ids=(), show_removed: bool | None = None,
                  changed_ids=None) -> None:
    """Make an existing Points layer show ``table`` (in place: display settings are kept).

    Parameters
    ----------
    layer : napari.layers.Points
    table : VesicleTable
    edited_ids : sequence of int
        Outlined in the "just edited" colour (the previous ones lose it).
    show_removed : bool, optional
        Also show the removed rows (default: as before, remembered in
        ``metadata["cryoves_show_removed"]``).
    changed_ids : sequence of int, optional
        Only these rows changed (and no row was added or dropped): only they are rewritten,
        which keeps an edit fast with thousands of vesicles. Ignored when the layer's rows do not
        match the table's ids one to one.
    """
    if show_removed is None:
        show_removed = bool(layer.metadata.get("cryoves_show_removed", False))
    same_view = bool(layer.metadata.get("cryoves_show_removed", False)) == bool(show_removed)
    layer.metadata["cryoves_show_removed"] = bool(show_removed)
    layer.metadata[VOXEL_KEY] = table.voxel_size
    if changed_ids is not None and same_view:
        n, m = len(layer.data), len(table)
        if _rows_match(layer, table, min(n, m)) and (m == n or min(n, m) > 0):
            changed = set(int(i) for i in changed_ids)
            if m != n:
                # rows appended (an add, a redo) or dropped at the end (its undo): resize the
                # layer's arrays without events, then rewrite the new rows (one refresh in all)
                with layer.events.blocker_all(), _refresh_blocked(layer):
                    layer.selected_data = set()
                    layer.data = table.centers if m > n else np.asarray(layer.data)[:m]
                changed |= set(int(i) for i in table.ids[n:])
            _update_rows(layer, table, changed, edited_ids, show_removed, extent=m != n)
            return
    status = np.asarray(table["status"], dtype=str)
    with layer.events.blocker_all():
        layer.data = table.centers if len(table) else np.empty((0, 3))
        layer.features = table_features(table)
        layer.size = _sizes(table)
        layer.shown = np.ones(len(table), bool) if show_removed else status == "accepted"
        if len(table):
            layer.border_color = outline_colors(table, edited_ids)
    layer.metadata["cryoves_edited_ids"] = tuple(int(i) for i in edited_ids)
    layer.refresh()


@contextlib.contextmanager
def quiet_layer_list(viewer, layers):
    """Within the block, events of ``layers`` are not relayed to ``viewer.layers``.

    napari's layer list relays every event of every layer to its view, which repaints the
    layer's row for each one (a data refresh, a highlight, a partial labels update), although it
    shows none of them (name, visibility, thumbnail). With software OpenGL that repaint costs a
    composition of the whole window. The layers' own listeners (the canvas) still get every event.
    """
    relay = getattr(getattr(viewer, "layers", None), "_reemit_child_event", None)
    with contextlib.ExitStack() as stack:
        if relay is not None:
            for layer in layers:
                events = getattr(layer, "events", None)
                if events is not None and hasattr(events, "blocker"):
                    stack.enter_context(events.blocker(relay))
        yield


def _constant_text(layer) -> bool:
    """The layer's text does not depend on its features (napari's default: no text)."""
    from napari.layers.utils.string_encoding import ConstantStringEncoding

    return isinstance(getattr(layer.text, "string", None), ConstantStringEncoding)


def _refresh_blocked(layer):
    """napari's own refresh blocker (a private context manager of napari 0.5-0.9), else nothing."""
    block = getattr(layer, "_block_refresh", None)
    return block() if callable(block) else contextlib.nullcontext()


def _rows_match(layer, table: VesicleTable, n: int | None = None) -> bool:
    """The layer's first ``n`` rows (default: all, and as many as the table's) hold the table's first ids."""
    f = layer.features
    if n is None:
        if len(layer.data) != len(table):
            return False
        n = len(table)
    return ("id" in f and len(f) == len(layer.data) >= n
            and np.array_equal(np.asarray(f["id"])[:n], table.ids[:n]))


def _update_rows(layer, table: VesicleTable, changed_ids, edited_ids, show_removed, extent: bool = False) -> None:
    """Rewrite only the rows of ``changed_ids`` (+ the previously and newly highlighted ones), one refresh."""
    previous = tuple(layer.metadata.get("cryoves_edited_ids", ()))
    touched = set(int(i) for i in changed_ids) | set(previous) | set(int(i) for i in edited_ids)
    rows = np.flatnonzero(np.isin(table.ids, np.fromiter(touched, np.int64, len(touched))))
    if len(rows):
        sub = table.select(rows)
        f = layer.features
        values = {name: sub[name] for name in sub.columns}
        if table.voxel_size is not None:
            values.update(radius_nm=sub.nm("radius"), thickness_nm=sub.nm("thickness"))
        cols = [(f.columns.get_loc(name), v) for name, v in values.items() if name in f.columns]
        for k, i in enumerate(rows):  # cell by cell: far faster than .loc for a few rows
            for j, v in cols:
                f.iat[int(i), j] = str(v[k]) if v.dtype == object else v[k]
        layer.data[rows] = sub.centers  # the layer's own arrays, written in place, then one refresh
        layer.size[rows] = _sizes(sub)
        layer.shown[rows] = True if show_removed else np.asarray(sub["status"], dtype=str) == "accepted"
        layer.border_color[rows] = outline_colors(sub, edited_ids)
        others = np.setdiff1d(np.arange(len(layer.data)), rows)
        if len(others):  # appended rows get napari's default width: use the others' (set for the zoom)
            layer.border_width[rows] = layer.border_width[others[0]]
        if not _constant_text(layer):  # text drawn from the features (e.g. the ids): recompute it
            layer.text.refresh(layer.features)
    layer.metadata["cryoves_edited_ids"] = tuple(int(i) for i in edited_ids)
    # the thumbnail of 1000s of points is slow; the selection highlight only needs redrawing when
    # there is a selection (or one was cleared above, when rows were appended or dropped)
    layer.refresh(thumbnail=False, extent=extent, highlight=extent or bool(len(layer.selected_data)))


def table_from_points(layer_or_data, features=None, size=None, metadata=None) -> VesicleTable:
    """Rebuild the :class:`~cryoves.VesicleTable` from a (possibly edited) Points layer.

    Positions come from the layer's data (moved points are honoured), the radius from its
    ``size`` (what is drawn: ``size / 2``; the 1-voxel dot of a row never fitted maps back to
    NaN), every other column from its features. Ids are never renumbered: a row whose id is
    missing or repeats an earlier row's id (a point added or pasted with napari's own tools,
    which copy the last row's features) gets a new id above the largest one.

    Parameters
    ----------
    layer_or_data : napari.layers.Points or ndarray
        The layer, or its ``data`` array (then pass ``features``, ``size``, ``metadata``,
        as a napari writer receives them).
    """
    import pandas as pd

    if hasattr(layer_or_data, "features"):
        layer = layer_or_data
        data, features, size, metadata = layer.data, layer.features, layer.size, layer.metadata
        vs = voxel_size_of(layer)
    else:
        data = layer_or_data
        metadata = metadata or {}
        vs = metadata.get(VOXEL_KEY)
    data = np.asarray(data, dtype=float).reshape(-1, 3)
    n = len(data)
    features = features if features is not None else pd.DataFrame(index=range(n))
    if not isinstance(features, pd.DataFrame):
        features = pd.DataFrame(features)
    has = {name for name in features.columns if len(features) == n}
    cols: dict[str, Any] = {"z": data[:, 0], "y": data[:, 1], "x": data[:, 2]}
    size = np.broadcast_to(np.asarray(size if size is not None else 2.0, dtype=float), (n,)).copy()
    radius = size / 2.0
    if "radius" in has:  # an unfitted row (NaN radius) is drawn as a 1-voxel dot: keep it NaN
        old = np.asarray(pd.to_numeric(features["radius"], errors="coerce"), dtype=float)
        radius[~np.isfinite(old) & (size == 1.0)] = np.nan
    cols["radius"] = radius
    ids = np.full(n, -1, dtype=np.int64)
    if "id" in has:
        raw = np.asarray(pd.to_numeric(features["id"], errors="coerce"), dtype=float)
        ok = np.isfinite(raw) & (raw >= 1)
        ids[ok] = raw[ok].astype(np.int64)
    seen: set[int] = set()
    fresh = int(ids.max()) + 1 if n and ids.max() >= 1 else 1
    for i in range(n):
        if ids[i] < 1 or int(ids[i]) in seen:
            ids[i] = fresh
            fresh += 1
        seen.add(int(ids[i]))
    cols["id"] = ids
    for name in COLUMNS:
        if name in cols or name not in has:
            continue
        values = features[name].to_numpy()
        if name == "status":
            values = np.array(["removed" if str(v) == "removed" else "accepted" for v in values], dtype=object)
        elif COLUMNS[name] is object:
            values = np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                               for v in values], dtype=object)
        cols[name] = values
    return VesicleTable(cols, voxel_size=vs)


def vesicle_layers_data(table: VesicleTable, tomogram: str, shape) -> list[tuple]:
    """Points layer (the table) and Labels layer (rendered from the table) as layer-data tuples."""
    pts = points_layer_data(table, tomogram, shape)
    labels = render_labels(table, shape)
    lab = (labels, labels_kwargs(table.voxel_size, layer_name(tomogram, "vesicle_labels"),
                                 "vesicle_labels", tomogram), "labels")
    return [lab, pts]


def add_or_update(viewer, layer_data: tuple):
    """Add a layer from a layer-data tuple, or update the existing layer of the same name and type.

    Updating (rather than removing and re-adding) keeps the user's display settings and
    the layer's place in the layer list, so rerunning a stage replaces its output.
    """
    data, kwargs, ltype = layer_data
    name = kwargs["name"]
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None and type(existing).__name__.lower() == ltype:
        if ltype == "points":
            with existing.events.blocker_all():
                existing.data = data
            existing.features = kwargs["features"]
            existing.size = kwargs["size"]
            existing.shown = kwargs["shown"]
            existing.border_color = kwargs["border_color"]
            existing.face_color = kwargs["face_color"]
            existing.refresh()
        else:
            existing.data = data
            if ltype == "image" and "contrast_limits" in kwargs:
                existing.contrast_limits = kwargs["contrast_limits"]
        existing.metadata.update(kwargs.get("metadata", {}))
        existing.scale = kwargs.get("scale", existing.scale)
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    kwargs = dict(kwargs)
    if ltype == "points":
        ndim = kwargs.pop("ndim", 3)
        return viewer.add_points(data, ndim=ndim, **kwargs)
    return getattr(viewer, f"add_{ltype}")(data, **kwargs)


def set_thick_slicing(viewer, points_layer) -> None:
    """Let the spheres of a Points layer show as discs in every slice they cross.

    The vesicles layer uses ``projection_mode="rescale_spherical"``; napari then draws a
    point as the disc where its sphere meets the slice, for points within the slice
    margins. This sets the margins of the non-displayed axes to the largest radius (in
    world units) if they are smaller. Labels layers ignore the margins; image layers whose
    projection mode is napari's default ``"mean"`` are switched to ``"none"`` so that the
    tomogram is still shown one plane at a time (not averaged over the thick slice).
    """
    if len(points_layer.data) == 0:
        return
    size = np.asarray(points_layer.size, dtype=float)
    scale = np.asarray(points_layer.scale, dtype=float)
    reach = float(np.nanmax(size)) / 2.0 * float(np.max(scale)) + float(np.max(scale))
    dims = viewer.dims
    nd = dims.ndim
    left = list(dims.margin_left) if len(dims.margin_left) == nd else [0.0] * nd
    right = list(dims.margin_right) if len(dims.margin_right) == nd else [0.0] * nd
    changed = False
    for ax in range(nd):
        if left[ax] < reach or right[ax] < reach:
            left[ax] = max(left[ax], reach)
            right[ax] = max(right[ax], reach)
            changed = True
    if changed:
        from napari.layers import Image

        for layer in viewer.layers:
            if isinstance(layer, Image) and str(layer.projection_mode) == "mean":
                layer.projection_mode = "none"
        dims.margin_left = tuple(left)
        dims.margin_right = tuple(right)
