"""Helpers of the napari plugin tests (imported by the test modules and conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_WEIGHTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"

def crop_box(shape, table, size=(48, 128, 128)):
    """A crop (tuple of slices) of ``size`` centred on the densest vesicle region."""
    c = np.median(table.centers, axis=0) if len(table) else np.array(shape) / 2
    sl = []
    for n, s, cc in zip(shape, size, c):
        s = min(s, n)
        lo = int(np.clip(round(cc - s / 2), 0, n - s))
        sl.append(slice(lo, lo + s))
    return tuple(sl)


def truth_in_crop(table, box, shape):
    """Ground-truth vesicles whose centre lies inside the crop (at least one radius from its faces,
    except where the face is the tomogram border)."""
    c = table.centers
    r = table.radii
    inside = np.ones(len(table), bool)
    for ax, s in enumerate(box):
        lo_margin = np.where(s.start > 0, r, 0)
        hi_margin = np.where(s.stop < shape[ax], r, 0)
        inside &= (c[:, ax] >= s.start + lo_margin) & (c[:, ax] < s.stop - hi_margin)
    return inside


def gt_probability(labels) -> np.ndarray:
    """A probability map derived from ground-truth labels: each vesicle minus its one-voxel inner
    boundary (so touching vesicles are separated, as a network's output is), smoothed."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    inner = (labels > 0) & ~find_boundaries(labels, mode="inner", connectivity=1)
    return np.clip(ndi.gaussian_filter(inner.astype(np.float32), 1.0) * 1.1, 0, 1).astype(np.float32)


def add_crop_layers(viewer, crop, name="crop", with_probability=True):
    """Add the crop as a tomogram layer (+ GT-derived probability) the way the plugin names them."""
    from cryoves.napari._layers import image_kwargs, layer_name

    vs = crop["voxel_size"]
    viewer.add_image(crop["tomogram"], **image_kwargs(vs, name, data=crop["tomogram"]))
    if with_probability:
        viewer.add_image(crop["probability"], **image_kwargs(vs, layer_name(name, "probability"),
                                                              role="probability", tomogram=name))
    return name


def wait_done(qtbot, widget, timeout=120_000):
    """Wait until the widget's task is over; return its outcome."""
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=timeout)
    return widget.runner.last_outcome


def click(qtbot, button):
    """Click a magicgui PushButton with the mouse, through Qt (as a user does)."""
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def close_dock(qtbot, widget):
    """Close a dock widget with the close button of its title bar (as a user does)."""
    from qtpy.QtCore import Qt

    dock_widget = widget.parent()
    qtbot.mouseClick(dock_widget.title.close_button, Qt.MouseButton.LeftButton)


def dock(viewer, widget_cls):
    w = widget_cls(viewer)
    viewer.window.add_dock_widget(w, name=f"{w.display_name} (cryoves)")
    return w
