"""Writing stage results into the viewer, without ever discarding a user's edits.

A stage rerun normally replaces its earlier output layer (same name, display settings kept).
A vesicles layer the editor has changed (``metadata["cryoves_edited"]`` is True) is never
replaced: the new result goes to new layers named ``"... (rerun)"`` and a notification says so.
"""

from __future__ import annotations

from cryoves.napari._layers import (add_or_update, image_kwargs, labels_kwargs, layer_name,
                                    points_layer_data, set_thick_slicing)
from cryoves.table import render_labels

__all__ = ["EDITED_KEY", "show_vesicles", "show_segmentation"]

#: Set to True in a vesicles layer's metadata by the editor once the user changed it.
EDITED_KEY = "cryoves_edited"
RERUN = " (rerun)"


def _free_names(viewer, tomo: str) -> tuple[str, str, bool]:
    """(points name, labels name, rerun?) for new vesicles of ``tomo``: the usual names unless edited."""
    pname, lname = layer_name(tomo, "vesicles"), layer_name(tomo, "vesicle_labels")
    suffix, n = "", 1
    while pname + suffix in viewer.layers and viewer.layers[pname + suffix].metadata.get(EDITED_KEY):
        suffix = RERUN if n == 1 else f" (rerun {n})"
        n += 1
    return pname + suffix, lname + suffix, bool(suffix)


def show_vesicles(viewer, table, tomo: str, shape):
    """Write the vesicles Points layer and the vesicle labels rendered from ``table``.

    Returns
    -------
    napari.layers.Points
        The vesicles layer written (a new ``"(rerun)"`` layer if the usual one holds edits).
    """
    pname, lname, rerun = _free_names(viewer, tomo)
    lab = (render_labels(table, shape), labels_kwargs(table.voxel_size, lname, "vesicle_labels", tomo), "labels")
    add_or_update(viewer, lab)
    layer = add_or_update(viewer, points_layer_data(table, tomo, shape, name=pname))
    set_thick_slicing(viewer, layer)
    if rerun:
        from napari.utils.notifications import show_warning

        show_warning(f"cryoves: {layer_name(tomo, 'vesicles')!r} holds your edits and was kept; "
                     f"the new result is in {pname!r}")
    return layer


def show_segmentation(viewer, result, tomo: str, shape, voxel_size: float):
    """Add every layer of a :class:`cryoves.pipeline.SegmentationResult` (the stage widgets' layers)."""
    if result.probability is not None:
        add_or_update(viewer, (result.probability, image_kwargs(
            voxel_size, layer_name(tomo, "probability"), role="probability", tomogram=tomo), "image"))
    stage = getattr(result, "stage_labels", None) or {}
    for key, role in (("global", "labels_global"), ("adaptive", "labels_adaptive")):
        lab = stage.get(key)
        if lab is None:
            continue
        extra = ({"cryoves_threshold": float(result.threshold)}
                 if key == "global" and result.threshold is not None else {})
        add_or_update(viewer, (lab, labels_kwargs(voxel_size, layer_name(tomo, role), role, tomo,
                                                  meta=extra, visible=False), "labels"))
    return show_vesicles(viewer, result.table, tomo, shape)
