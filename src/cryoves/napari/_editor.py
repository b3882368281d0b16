"""The vesicle editor dock widget ("6. Edit vesicles"): a thin napari front end of :mod:`cryoves.edit`.

The widget owns no editing logic. It maps mouse clicks and keys to calls of a
:class:`cryoves.edit.VesicleEditor` and shows the editor's state:

* the vesicles Points layer is a view of ``editor.table`` (:func:`~cryoves.napari._layers.update_points`);
  points added, moved or deleted with napari's own Points tools are routed through the editor too
  (fitted, logged, undoable), so no row ever bypasses it;
* the vesicle labels layer shows ``editor.labels`` (the same array); after an edit only the
  changed box is repainted, and only when it crosses the displayed slice;
* every edit is logged and the table autosaved by the editor, in a folder the user chose or a
  per-user cache folder (:mod:`cryoves.napari._editor_session`); reopening the same tomogram
  offers to restore the last edits;
* a review queue steps through the doubtful vesicles, worst first, with Accept / Reject / Next;
* *Fine-tune on corrections* trains the current U-Net on the corrected table of this tomogram
  (in the plugin's one TensorFlow thread) and can re-predict the probability map with it.

Key bindings (:data:`KEYS`) are bound on the viewer and on the editor's two layers while the
widget is open, and removed when it closes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton,
                               TextEdit)
from qtpy.QtCore import QObject, Qt
from qtpy.QtWidgets import QButtonGroup, QFrame, QHBoxLayout, QRadioButton, QSizePolicy, QVBoxLayout, QWidget

from cryoves.napari._editor_session import EditPaths, edit_paths
from cryoves.napari._layers import (ROLE_KEY, SHAPE_KEY, TOMO_KEY, base_name, labels_kwargs,
                                    layer_name, quiet_layer_list, set_thick_slicing, table_from_points,
                                    update_points, voxel_size_of)
from cryoves.napari._runner import TaskRunner, describe_error
from cryoves.napari._base import materialize, tomogram_array

__all__ = ["EditorWidget", "KEYS", "MODES", "EDITED_KEY"]

log = logging.getLogger("cryoves.napari")

#: Set on a vesicles layer after its first edit: stage widgets then refuse to overwrite it silently.
EDITED_KEY = "cryoves_edited"

#: Editing modes: name -> (button text, what a left click does).
MODES = {
    "navigate": ("Navigate", "pan and zoom; clicks edit nothing"),
    "add": ("Add", "click on a missed vesicle: a sphere is fitted to its membrane"),
    "remove": ("Remove", "click inside a vesicle to remove it; Shift-drag a box to remove every vesicle in it"),
    "move": ("Move / resize", "drag a vesicle to move it; + / - change the radius of the selected one"),
    "refit": ("Refit", "click a vesicle to fit its sphere again"),
}

#: Key bindings: key -> (method of EditorWidget, description shown in the widget).
KEYS = {
    "Escape": ("mode_navigate", "Navigate mode"),
    "I": ("mode_add", "Add mode"),
    "X": ("mode_remove", "Remove mode"),
    "M": ("mode_move", "Move / resize mode"),
    "F": ("mode_refit", "Refit mode"),
    "=": ("grow", "radius + 0.5 voxel (selected vesicle)"),
    "-": ("shrink", "radius - 0.5 voxel (selected vesicle)"),
    "Control-Z": ("undo", "undo"),
    "Control-Shift-Z": ("redo", "redo"),
    "A": ("review_accept", "review: accept"),
    "R": ("review_reject", "review: reject"),
    "N": ("review_next", "review: next (skip)"),
}

#: Keys of :data:`KEYS` also bound as Qt shortcuts of the canvas widget (napari key name -> Qt's):
#: Qt runs a shortcut before the key press reaches napari, whose own key dispatch (it rebuilds the
#: active keymap of the viewer and layers on every press) costs ~3 ms of the main thread per key.
CANVAS_SHORTCUTS = {"Control-Z": "Ctrl+Z", "Control-Shift-Z": "Ctrl+Shift+Z"}

RADIUS_STEP_VOX = 0.5


def _camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class _TimeUp(Exception):
    """The fine-tuning time budget is spent (not a cancellation: the best weights are kept)."""


class EditorWidget(QWidget):
    """Dock widget: add, remove, move, resize and refit vesicles by clicking; undo; review; fine-tune.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).

    Attributes
    ----------
    editor : cryoves.edit.VesicleEditor or None
        The editing state, once *Start editing* was pressed.
    restore_answer : bool or None
        Programmatic answer to the "restore the last edits?" question (tests); ``None`` asks
        in the widget.
    """

    display_name = "6. Edit vesicles"

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.editor = None
        self.points = None
        self.labels_layer = None
        self._labels_visible_before = None  # the labels layer's visibility before editing
        self._tomo_layer = None
        self._paths: EditPaths | None = None
        self._mode = "navigate"
        self._selected_id: int | None = None
        self._syncing = False
        self._last_ids: np.ndarray = np.empty(0, np.int64)
        self._pending_plain: np.ndarray | None = None
        self._queue: list[int] = []
        self._queue_pos = 0
        self._bound: list[tuple[object, str, object]] = []
        self._shortcuts: list = []  # QShortcut objects of CANVAS_SHORTCUTS
        self._modifier_filter = None  # _BareModifierFilter of the canvas
        self._gc_hold: _GcHold | None = None  # this widget's hold of the gc.freeze (while editing)
        self._filtered_canvas = None
        self._finetuned: Path | None = None
        self.restore_answer: bool | None = None
        self.last_timing: dict[str, float] = {}
        self._paint_held = None  # the canvas signal the dock's painting waits for
        self._post_frame: list[Callable[[], None]] = []  # what waits for it too
        self._hold_seq = 0
        self._build()
        self._bind_keys()
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.viewer.layers.events.inserted.connect(self.reset_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.selection.events.active.connect(self._enforce_mouse)
        _camera(self.viewer).events.zoom.connect(self._update_outline_width)

    # ------------------------------------------------------------------ layout
    def _build(self):
        self.tomogram = ComboBox(label="Tomogram", choices=self._image_choices,
                                 tooltip="The tomogram the vesicles belong to (membranes dark)")
        self.vesicles = ComboBox(label="Vesicles", choices=self._points_choices,
                                 tooltip="The vesicles layer to edit (from Refine, Outliers or the full pipeline)")
        self.folder = FileEdit(mode="d", value="", label="Edits folder",
                               tooltip="Where the edit log, the autosaved table and fine-tuned weights go "
                                       "(<name>_edits.jsonl ...). Empty: a per-user cache folder for this tomogram")
        self.start_button = PushButton(text="Start editing")
        self.finish_button = PushButton(text="Stop editing", enabled=False,
                                        tooltip="Stop editing (everything is already saved in the edit log)")
        top = Container(widgets=[self.tomogram, self.vesicles, self.folder], labels=True)
        starts = Container(widgets=[self.start_button, self.finish_button], layout="horizontal", labels=False)
        starts.margins = (0, 0, 0, 0)

        # restore banner (hidden until needed)
        self.restore_frame = QFrame()
        self.restore_frame.setFrameShape(QFrame.StyledPanel)
        self.restore_label = Label(value="")
        self.restore_label.native.setWordWrap(True)
        self.restore_button = PushButton(text="Restore edits")
        self.fresh_button = PushButton(text="Start fresh",
                                       tooltip="Keep the old log aside (renamed) and start from the layer's table")
        rl = QVBoxLayout(self.restore_frame)
        rl.setContentsMargins(4, 4, 4, 4)
        rl.addWidget(self.restore_label.native)
        rb = QHBoxLayout()
        rb.addWidget(self.restore_button.native)
        rb.addWidget(self.fresh_button.native)
        rl.addLayout(rb)
        self.restore_frame.setVisible(False)

        # modes
        self.mode_help = Label(value=MODES["navigate"][1])
        self.mode_help.native.setWordWrap(True)
        self.mode_frame = QFrame()
        ml = QHBoxLayout(self.mode_frame)
        ml.setContentsMargins(0, 0, 0, 0)
        self.mode_group = QButtonGroup(self)
        self.mode_buttons: dict[str, QRadioButton] = {}
        for mode, (text, tip) in MODES.items():
            b = QRadioButton(text)
            b.setToolTip(tip)
            self.mode_group.addButton(b)
            self.mode_buttons[mode] = b
            ml.addWidget(b)
            b.toggled.connect(lambda on, m=mode: on and self.set_mode(m))
        self.mode_buttons["navigate"].setChecked(True)

        self.plain_radius = FloatSpinBox(value=15.0, min=1.0, max=100.0, step=0.5, label="Plain sphere radius (nm)",
                                         tooltip="Radius of a plain sphere, added where no membrane could be fitted")
        self.plain_button = PushButton(text="Add plain sphere there", enabled=False,
                                       tooltip="Add a sphere of the radius above where the last Add click found "
                                               "no membrane")
        self.undo_button = PushButton(text="Undo", enabled=False)
        self.redo_button = PushButton(text="Redo", enabled=False)
        edit_box = Container(widgets=[self.plain_radius], labels=True)
        edit_buttons = Container(widgets=[self.plain_button, self.undo_button, self.redo_button],
                                 layout="horizontal", labels=False)
        edit_buttons.margins = (0, 0, 0, 0)

        # display
        self.outline_px = FloatSpinBox(value=1.5, min=0.5, max=6.0, step=0.5, label="Outline (px)",
                                       tooltip="Width of the vesicle outlines in screen pixels")
        self.show_ids = CheckBox(text="Show ids", value=False, label="")
        self.show_rejected = CheckBox(text="Show rejected (red)", value=False, label="",
                                      tooltip="Also show the candidates the pipeline or you rejected")
        self.show_labels = CheckBox(text="Filled labels", value=False, label="",
                                    tooltip="Show the label volume while editing (the outlines show every vesicle; "
                                            "the filled labels hide the membrane and cost drawing time per frame)")
        display = Container(widgets=[self.outline_px, self.show_ids, self.show_rejected, self.show_labels],
                            labels=True)

        # review
        self.review_button = PushButton(text="Review queue", tooltip="Step through the doubtful vesicles, worst first")
        self.accept_button = PushButton(text="Accept (A)", enabled=False)
        self.reject_button = PushButton(text="Reject (R)", enabled=False)
        self.next_button = PushButton(text="Next (N)", enabled=False)
        self.review_counter = Label(value="")
        review = Container(widgets=[self.review_button, self.accept_button, self.reject_button, self.next_button],
                           layout="horizontal", labels=False)
        review.margins = (0, 0, 0, 0)
        _fix_size(self.review_counter.native, "00000 / 00000 reviewed")

        # fine-tune
        self.weights = FileEdit(mode="r", filter="*.h5", value="", label="Weights",
                                tooltip="The U-Net to fine-tune. Empty: the default weights shipped with cryoves")
        self.minutes = FloatSpinBox(value=5.0, min=0.05, max=120.0, step=0.5, label="Minutes",
                                    tooltip="Training time budget (at least one short epoch is run); the best weights so far are kept")
        self.finetune_button = PushButton(text="Fine-tune on corrections",
                                          tooltip="Train the model on this tomogram's corrected vesicles")
        self.repredict_button = PushButton(text="Re-predict", enabled=False,
                                           tooltip="Predict the probability map again with the fine-tuned weights")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=0, visible=False)
        tune = Container(widgets=[self.weights, self.minutes], labels=True)
        tune_buttons = Container(widgets=[self.finetune_button, self.repredict_button, self.cancel_button],
                                 layout="horizontal", labels=False)
        tune_buttons.margins = (0, 0, 0, 0)

        self.status = TextEdit(value="Choose the tomogram and its vesicles, then Start editing.")
        _quiet_text(self.status, lines=4)
        keys = "<br>".join(f"<b>{k}</b>: {d}" for k, (_, d) in KEYS.items())
        self.keys_label = Label(value=f"<small>Keys (canvas focused): <br>{keys}</small>")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(2)
        for w in (top.native, starts.native, self.restore_frame, self.mode_frame, self.mode_help.native,
                  edit_box.native, edit_buttons.native, _section("Display"), display.native,
                  _section("Review"), review.native, self.review_counter.native, _section("Fine-tune"),
                  tune.native, tune_buttons.native, self.progress_bar.native, self.status.native,
                  self.keys_label.native):
            layout.addWidget(w)
        layout.addStretch(1)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        self.runner = TaskRunner([self.finetune_button], self.cancel_button, self.progress_bar, self.status)

        self.start_button.changed.connect(self._guard(self.start))
        self.finish_button.changed.connect(self._guard(self.finish))
        self.restore_button.changed.connect(self._guard(lambda: self._begin(restore=True)))
        self.fresh_button.changed.connect(self._guard(lambda: self._begin(restore=False)))
        self.plain_button.changed.connect(self._guard(self.add_plain_sphere))
        self.undo_button.changed.connect(self._guard(self.undo))
        self.redo_button.changed.connect(self._guard(self.redo))
        self.outline_px.changed.connect(self._update_outline_width)
        self.show_ids.changed.connect(self._update_text)
        self.show_rejected.changed.connect(lambda *_: self._refresh_points())
        self.show_labels.changed.connect(self._update_labels_visibility)
        self.review_button.changed.connect(self._guard(self.start_review))
        self.accept_button.changed.connect(self._guard(self.review_accept))
        self.reject_button.changed.connect(self._guard(self.review_reject))
        self.next_button.changed.connect(self._guard(self.review_next))
        self.finetune_button.changed.connect(self._guard(self.finetune))
        self.repredict_button.changed.connect(self._guard(self.repredict))
        self.tomogram.changed.connect(self._autoselect)
        self._set_editing_enabled(False)
        self.reset_choices()

    # ------------------------------------------------------------------ plumbing
    def _guard(self, fn: Callable) -> Callable:
        """Wrap a button/key action: a failure becomes a one-line message, never a traceback."""

        def call(*_):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                self._error(exc)

        return call

    def _error(self, exc) -> None:
        from napari.utils.notifications import show_error

        msg = describe_error(exc) if isinstance(exc, BaseException) else str(exc)
        self.status.value = msg
        log.debug("cryoves editor: %s", msg, exc_info=isinstance(exc, BaseException))
        show_error(f"cryoves: {msg}")

    def _image_choices(self, *_):
        from napari.layers import Image

        from cryoves.napari._base import NOT_TOMOGRAM

        return [(l.name, l) for l in self.viewer.layers
                if isinstance(l, Image) and l.metadata.get(ROLE_KEY) not in NOT_TOMOGRAM]

    def _points_choices(self, *_):
        from napari.layers import Points

        return [(l.name, l) for l in self.viewer.layers
                if isinstance(l, Points) and l.metadata.get(ROLE_KEY) != "truth_vesicles"]

    def reset_choices(self, *_):
        """Refresh the layer pickers (napari calls this when layers change)."""
        self.tomogram.reset_choices()
        self.vesicles.reset_choices()
        self._autoselect()

    def _autoselect(self, *_):
        layer = self.tomogram.value
        if layer is None:
            return
        tomo = base_name(layer)
        for c in self.vesicles.choices:
            if c is not None and (c.name == layer_name(tomo, "vesicles") or (
                    c.metadata.get(ROLE_KEY) == "vesicles" and c.metadata.get(TOMO_KEY) == tomo)):
                if self.vesicles.value is not c:
                    self.vesicles.value = c
                break

    def _on_layer_removed(self, event=None):
        layer = getattr(event, "value", None)
        if self.editor is not None and layer is not None and layer in (self.points, self._tomo_layer,
                                                                     self.labels_layer):
            self.finish()
            self.status.value = f"Editing stopped: layer {layer.name!r} was closed (every edit is in the log)."
        self.reset_choices()

    def _set_editing_enabled(self, on: bool) -> None:
        self.mode_frame.setEnabled(on)
        for w in (self.undo_button, self.redo_button, self.review_button, self.finetune_button):
            w.enabled = on
        self.finish_button.enabled = on
        self.start_button.enabled = not on
        for w in (self.tomogram, self.vesicles, self.folder):
            w.enabled = not on
        if on:
            self._update_undo_buttons()
        else:
            self.plain_button.enabled = False
            for w in (self.accept_button, self.reject_button, self.next_button):
                w.enabled = False

    # ------------------------------------------------------------------ session
    def start(self) -> None:
        """Start editing the chosen vesicles layer (asks first when earlier edits of this tomogram exist)."""
        layer = self.tomogram.value
        pts = self.vesicles.value
        if layer is None:
            raise ValueError("no tomogram layer: open one first")
        if pts is None:
            raise ValueError("no vesicles layer: run Refine (or the full pipeline) first")
        vs = voxel_size_of(layer) or voxel_size_of(pts)
        if vs is None:
            raise ValueError(f"the voxel size of {layer.name!r} is unknown: enter it in the Predict widget")
        tomo = materialize(tomogram_array(layer))
        shape = pts.metadata.get(SHAPE_KEY)
        if shape is not None and tuple(shape) != tuple(tomo.shape):
            raise ValueError(f"vesicles layer {pts.name!r} belongs to a {tuple(shape)} volume, "
                             f"tomogram {layer.name!r} is {tuple(tomo.shape)}")
        folder = self.folder.value
        self._paths = edit_paths(layer, tomo, None if str(folder).strip() in ("", ".") else folder)
        self._tomo_layer, self._tomo, self._vs = layer, tomo, float(vs)
        self.points = pts
        n = self._paths.n_logged()
        if n:
            answer = self.restore_answer
            if answer is None:
                self.restore_label.value = (f"<b>{n} edit(s) of this tomogram from {self._paths.when()}</b> are in "
                                            f"{self._paths.log}. Restore them?")
                self.restore_frame.setVisible(True)
                self.start_button.enabled = False
                self.status.value = "Restore the last edits, or start fresh (the old log is kept, renamed)."
                return
            self._begin(restore=bool(answer))
            return
        self._begin(restore=False)

    def _begin(self, restore: bool) -> None:
        from cryoves import io
        from cryoves.edit import VesicleEditor

        self.restore_frame.setVisible(False)
        paths, tomo, vs = self._paths, self._tomo, self._vs
        if paths is None:
            raise ValueError("press Start editing first")
        t0 = time.perf_counter()
        if restore:
            base = io.read_vesicles_csv(paths.base, voxel_size=vs)
            editor = VesicleEditor.restore(tomo, vs, paths.log, base, autosave_path=paths.autosave)
            line = f"Restored {editor.n_edits} edit(s) from {paths.log.name}"
        else:
            aside = paths.set_aside()
            table = table_from_points(self.points)
            if table.voxel_size is None:
                table.voxel_size = vs
            io.write_vesicles_csv(paths.base, table, overwrite=True)
            editor = VesicleEditor(tomo, table, vs, log_path=paths.log, autosave_path=paths.autosave)
            line = "Editing" + (f" (the previous log was kept as {aside[0].name})" if aside else "")
        self.editor = editor
        editor.on_change(self._on_edit)
        self._attach_layers()
        if self._gc_hold is None:
            # after the layers are attached: what exists now is frozen; released when editing
            # stops, or when the widget is deleted with its viewer while editing
            self._gc_hold = _GcHold()
            self.destroyed.connect(self._gc_hold.release)
        self._set_editing_enabled(True)
        self._last_ids = np.asarray(editor.table.ids).copy()
        self._refresh_points()
        self._update_counter()
        hint = software_gl_hint()
        if hint:
            log.info("cryoves editor: %s", hint)
        # the tip first: the status box shows four lines, and the log line can fill them
        self.status.value = (f"{hint}\n" if hint else "") + (
            f"{line}; log: {paths.log}  ({time.perf_counter() - t0:.1f} s)")

    def _attach_layers(self) -> None:
        ed = self.editor
        tomo_name = base_name(self._tomo_layer)
        lname = layer_name(tomo_name, "vesicle_labels")
        lab = self.viewer.layers[lname] if lname in self.viewer.layers else None
        from napari.layers import Labels

        if isinstance(lab, Labels) and tuple(lab.data.shape) == tuple(ed.labels.shape):
            lab.data = ed.labels
        else:
            if lab is not None:
                self.viewer.layers.remove(lab)
            lab = self.viewer.add_labels(ed.labels, **labels_kwargs(self._vs, lname, "vesicle_labels", tomo_name))
        self.labels_layer = lab
        self._labels_painting = lab.editable
        if self._labels_visible_before is None:
            self._labels_visible_before = bool(lab.visible)
        self._update_labels_visibility()
        try:
            lab.editable = False  # painting by hand would bypass the editor
        except Exception:  # noqa: BLE001
            pass
        pts = self.points
        pts.metadata.setdefault(SHAPE_KEY, tuple(int(s) for s in ed.labels.shape))
        pts.mode = "pan_zoom"
        pts.events.data.connect(self._on_points_data)
        pts.events.mode.connect(self._on_points_mode)
        for layer in (pts, lab):
            self._bind_layer_keys(layer)
        self.viewer.layers.selection.active = pts
        self._update_outline_width()
        self._update_text()

    def finish(self) -> None:
        """Stop editing (the log and autosave stay; the layers keep the edited table)."""
        pts = self.points
        if pts is not None:
            for ev, cb in ((pts.events.data, self._on_points_data), (pts.events.mode, self._on_points_mode)):
                try:
                    ev.disconnect(cb)
                except Exception:  # noqa: BLE001
                    pass
        self._unbind_layer_keys()
        if self.editor is not None:
            try:
                self.editor.close()  # finishes the autosave, closes the log
            except Exception as exc:  # noqa: BLE001
                self._error(exc)
        if self.labels_layer is not None:
            try:
                self.labels_layer.editable = True
                if self._labels_visible_before is not None:
                    self.labels_layer.visible = self._labels_visible_before  # as before editing
            except Exception:  # noqa: BLE001
                pass
        self._labels_visible_before = None
        self.editor = None
        hold, self._gc_hold = self._gc_hold, None
        if hold is not None:
            hold.release()
        self._queue = []
        self.set_mode("navigate")
        self._set_editing_enabled(False)
        self.review_counter.value = ""
        self.status.value = "Editing stopped; every edit is in the log."

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.close_editor()
        super().closeEvent(event)

    def event(self, ev):  # noqa: D102 - Qt API
        from qtpy.QtCore import QEvent

        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):  # napari closed the dock: it only un-parents the widget
                self.close_editor()
        return super().event(ev)

    def close_editor(self) -> None:
        """Remove every binding and callback of the widget (its dock is closing)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._release_dock_paint()
        if self.editor is not None:
            self.finish()
        self.runner.cancel()
        self._unbind_all()
        for cb_list, cb in ((self.viewer.mouse_drag_callbacks, self._on_mouse),):
            if cb in cb_list:
                cb_list.remove(cb)
        for ev, cb in ((self.viewer.layers.events.inserted, self.reset_choices),
                       (self.viewer.layers.events.removed, self._on_layer_removed),
                       (self.viewer.layers.selection.events.active, self._enforce_mouse),
                       (_camera(self.viewer).events.zoom, self._update_outline_width)):
            try:
                ev.disconnect(cb)
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ keys
    def _key_callback(self, method: str):
        fn = self._guard(getattr(self, method))

        def callback(*_):
            fn()

        callback.__name__ = f"cryoves_editor_{method}"
        callback.__doc__ = dict((m, d) for m, d in KEYS.values())[method]
        return callback

    def _bind_keys(self) -> None:
        for key, (method, _) in KEYS.items():
            cb = self._key_callback(method)
            old = self.viewer.bind_key(key, cb, overwrite=True)
            self._bound.append((self.viewer, key, old))
        self._bind_canvas_shortcuts()

    def _bind_canvas_shortcuts(self) -> None:
        """Bind :data:`CANVAS_SHORTCUTS` as Qt shortcuts of the canvas (as well as napari keys).

        With the canvas focused (where the editing keys are pressed), Qt takes the key as the
        shortcut and napari's key dispatch does not run for it (~3 ms saved per undo / redo);
        with the focus elsewhere napari's binding still applies.
        """
        try:
            from qtpy.QtGui import QKeySequence, QShortcut
        except ImportError:  # Qt 5: QShortcut lives in QtWidgets
            from qtpy.QtGui import QKeySequence
            from qtpy.QtWidgets import QShortcut
        native = getattr(getattr(getattr(getattr(self.viewer, "window", None), "_qt_viewer", None), "canvas", None),
                         "native", None)
        if native is None:
            return  # no Qt canvas (headless viewer model): napari's bindings only
        for key, seq in CANVAS_SHORTCUTS.items():
            sc = QShortcut(QKeySequence(seq), native)
            sc.setContext(Qt.ShortcutContext.WidgetShortcut)
            sc.activated.connect(self._key_callback(KEYS[key][0]))
            self._shortcuts.append(sc)
        self._modifier_filter = _BareModifierFilter(self)
        native.installEventFilter(self._modifier_filter)
        self._filtered_canvas = native

    def _bind_layer_keys(self, layer) -> None:
        for key, (method, _) in KEYS.items():
            old = layer.bind_key(key, self._key_callback(method), overwrite=True)
            self._bound.append((layer, key, old))

    def _unbind_layer_keys(self) -> None:
        keep = []
        for owner, key, old in reversed(self._bound):
            if owner is self.viewer:
                keep.append((owner, key, old))
                continue
            owner.bind_key(key, old, overwrite=True)
        self._bound = list(reversed(keep))

    def _unbind_all(self) -> None:
        for owner, key, old in reversed(self._bound):
            owner.bind_key(key, old, overwrite=True)  # old None: unbinds
        self._bound = []
        for sc in self._shortcuts:
            try:
                sc.setEnabled(False)
                sc.setParent(None)
                sc.deleteLater()
            except RuntimeError:  # the canvas (the shortcut's parent) is gone already
                pass
        self._shortcuts = []
        canvas, self._filtered_canvas = getattr(self, "_filtered_canvas", None), None
        if canvas is not None:
            try:
                canvas.removeEventFilter(self._modifier_filter)
            except RuntimeError:  # the canvas is gone already
                pass

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: str) -> None:
        """Switch the editing mode (see :data:`MODES`)."""
        if mode not in MODES:
            raise ValueError(f"unknown editor mode {mode!r}; modes: {list(MODES)}")
        if mode != "navigate" and self.editor is None:
            self.status.value = "Press Start editing first."
            mode = "navigate"
        self._mode = mode
        b = self.mode_buttons[mode]
        if not b.isChecked():
            b.setChecked(True)
        self.mode_help.value = MODES[mode][1]
        self._enforce_mouse()

    def mode_navigate(self):
        self.set_mode("navigate")

    def mode_add(self):
        self.set_mode("add")

    def mode_remove(self):
        self.set_mode("remove")

    def mode_move(self):
        self.set_mode("move")

    def mode_refit(self):
        self.set_mode("refit")

    @property
    def mode(self) -> str:
        return self._mode

    def _enforce_mouse(self, *_):
        """In an editing mode a left drag edits rather than pans (wheel zoom still works)."""
        pan = self._mode == "navigate"
        if self.points is not None and self.editor is not None:
            self.points.mouse_pan = pan
        _camera(self.viewer).mouse_pan = pan

    # ------------------------------------------------------------------ mouse
    def _to_data(self, position) -> np.ndarray:
        return np.asarray(self._tomo_layer.world_to_data(position), dtype=float)[-3:]

    def _on_mouse(self, viewer, event):
        if self.editor is None or self._mode == "navigate" or getattr(event, "button", 1) != 1:
            return
        if viewer.dims.ndisplay != 2:
            self.status.value = "Edit in 2D (the editor works on slices)."
            return
        # the press is the editor's: vispy then skips its picking render of the whole scene (it only
        # looks for a visual to hand the press to, i.e. the camera, which must not pan here anyway)
        _mark_handled(event)
        p0 = self._to_data(event.position)
        mode = self._mode
        shift = "Shift" in {str(m) for m in getattr(event, "modifiers", ())} or \
            any(getattr(m, "name", "") == "Shift" for m in getattr(event, "modifiers", ()))
        if mode == "remove" and shift:
            yield from self._drag_box(event, p0)
            return
        if mode == "move":
            yield from self._drag_move(event, p0)
            return
        moved = False
        yield
        while event.type == "mouse_move":
            moved = True
            yield
        if moved and np.linalg.norm(self._to_data(event.position)[1:] - p0[1:]) > 2:
            return  # a drag, not a click
        self._guard(lambda: self.click(mode, p0))()

    def click(self, mode: str, point) -> None:
        """What a left click at data position ``point`` (z, y, x voxels) does in ``mode``."""
        ed = self.editor
        point = np.asarray(point, dtype=float)
        if mode == "add":
            from cryoves.edit import NoMembraneFound

            t0 = time.perf_counter()
            try:
                vid = ed.add_at(point)
            except NoMembraneFound as exc:
                r_nm = float(getattr(exc, "suggested_radius", np.nan)) * self._vs
                if np.isfinite(r_nm):
                    self.plain_radius.value = round(r_nm, 1)
                self._pending_plain = point
                self.plain_button.enabled = True
                self.status.value = (f"No membrane found at z={point[0]:.0f}, y={point[1]:.0f}, x={point[2]:.0f}: "
                                     f"{exc}. Add a plain sphere of the radius above, or click elsewhere.")
                return
            self._pending_plain = None
            self.plain_button.enabled = False
            self.last_timing["add"] = time.perf_counter() - t0
            row = self._row(vid)
            self.status.value = (f"Added vesicle {vid}: radius {row['radius'] * self._vs:.1f} nm "
                                 f"({self.last_timing['add'] * 1000:.0f} ms)")
        elif mode in ("remove", "refit", "move"):
            vid = ed.id_at(point)
            if vid is None:
                self.status.value = "No vesicle there."
                return
            if mode == "remove":
                ed.remove([vid])
                self.status.value = f"Removed vesicle {vid} (Ctrl+Z to undo)"
            elif mode == "refit":
                ed.refit(vid)
                self.status.value = f"Refitted vesicle {vid}: radius {self._row(vid)['radius'] * self._vs:.1f} nm"
            else:
                self.select(vid)

    def _drag_box(self, event, p0):
        kw = {"units": tuple(self._tomo_layer.units)[-2:]} if hasattr(self._tomo_layer, "units") else {}
        shapes = self.viewer.add_shapes(name="cryoves remove box", edge_color="#ff3030", face_color="transparent",
                                        edge_width=1.0, scale=self._tomo_layer.scale[-2:], ndim=2, **kw)
        self.viewer.layers.selection.active = self.points
        p1 = p0
        yield
        while event.type == "mouse_move":
            p1 = self._to_data(event.position)
            shapes.data = [np.array([[p0[1], p0[2]], [p0[1], p1[2]], [p1[1], p1[2]], [p1[1], p0[2]]])]
            yield
        p1 = self._to_data(event.position)
        self.viewer.layers.remove(shapes)
        self._guard(lambda: self.remove_box(p0, p1))()

    def remove_box(self, p0, p1) -> list[int]:
        """Remove every accepted vesicle whose disc in the current slice has its centre in the (y, x) box."""
        ed = self.editor
        t = ed.table
        z = float(p0[0])
        lo = np.minimum(p0[1:], p1[1:])
        hi = np.maximum(p0[1:], p1[1:])
        c = t.centers
        sel = ((np.asarray(t["status"]) == "accepted") & (np.abs(c[:, 0] - z) < t.radii)
               & np.all((c[:, 1:] >= lo) & (c[:, 1:] <= hi), axis=1))
        ids = [int(i) for i in t.ids[sel]]
        if not ids:
            self.status.value = "No vesicle in that box."
            return []
        ed.remove(ids)
        self.status.value = f"Removed {len(ids)} vesicles (Ctrl+Z to undo)"
        return ids

    def _drag_move(self, event, p0):
        ed = self.editor
        vid = ed.id_at(p0)
        if vid is None:
            self.status.value = "No vesicle there."
            return
        self.select(vid)
        i = self._index(vid)
        start = np.array(self.points.data[i], dtype=float)
        moved = False
        yield
        while event.type == "mouse_move":
            p = self._to_data(event.position)
            new = start.copy()
            new[1:] += p[1:] - p0[1:]
            self._syncing = True
            try:
                data = np.array(self.points.data)
                data[i] = new
                self.points.data = data  # preview only; the edit happens on release
            finally:
                self._syncing = False
            moved = True
            yield
        p = self._to_data(event.position)
        if moved or np.linalg.norm(p[1:] - p0[1:]) > 0.5:
            new = start.copy()
            new[1:] += p[1:] - p0[1:]
            self._guard(lambda: ed.move(vid, new))()
            self.status.value = f"Moved vesicle {vid}"

    # ------------------------------------------------------------------ edits
    def add_plain_sphere(self) -> None:
        """Add a plain sphere (radius from the field) where the last Add click found no membrane."""
        if self._pending_plain is None:
            raise ValueError("no pending position: click in Add mode first")
        r = float(self.plain_radius.value) / self._vs
        vid = self.editor.add_sphere(self._pending_plain, r)
        self._pending_plain = None
        self.plain_button.enabled = False
        self.status.value = f"Added plain sphere {vid} (radius {self.plain_radius.value:.1f} nm)"

    def undo(self) -> None:
        if self.editor is None:
            return
        ev = self.editor.undo()
        self.status.value = "Nothing to undo." if ev is None else f"Undone: {ev.kind} {_ids_text(ev.ids)}"

    def redo(self) -> None:
        if self.editor is None:
            return
        ev = self.editor.redo()
        self.status.value = "Nothing to redo." if ev is None else f"Redone: {ev.kind} {_ids_text(ev.ids)}"

    def select(self, vid: int) -> None:
        self._selected_id = int(vid)
        i = self._index(vid)
        if i is not None:
            self.points.selected_data = {i}
        self.status.value = f"Selected vesicle {vid}: radius {self._row(vid)['radius'] * self._vs:.1f} nm (+ / - resize)"

    def _resize_selected(self, step: float) -> None:
        if self.editor is None:
            return
        vid = self._selected_id
        if vid is None:
            self.status.value = "Select a vesicle first (Move / resize mode, click it)."
            return
        r = float(self._row(vid)["radius"]) + step
        if r < 1.0:
            raise ValueError("radius would drop below 1 voxel")
        self.editor.resize(vid, r)
        self.status.value = f"Vesicle {vid}: radius {r * self._vs:.1f} nm"

    def grow(self):
        self._resize_selected(+RADIUS_STEP_VOX)

    def shrink(self):
        self._resize_selected(-RADIUS_STEP_VOX)

    # ------------------------------------------------------------------ editor -> layers
    def _row(self, vid: int) -> dict:
        return self.editor.row(vid)

    def _index(self, vid: int) -> int | None:
        hits = np.flatnonzero(np.asarray(self.editor.table.ids) == int(vid))
        return int(hits[0]) if len(hits) else None

    def _on_edit(self, event) -> None:
        """The editor changed: repaint the changed box, update the points, flag the layer as edited.

        Only the canvas is redrawn at once. The dock's texts and buttons (status, counter, Undo /
        Redo) are updated now but painted after the canvas has shown the edit
        (:meth:`_hold_dock_paint`), and napari's layer list is not told (nothing it shows changed):
        with software OpenGL each repainted widget makes Qt compose the whole window again, which
        would delay the frame that shows the edit by ~10 ms per widget.
        """
        if self.editor is None:
            return
        try:
            self._hold_dock_paint()
            t0 = time.perf_counter()
            with quiet_layer_list(self.viewer, (self.points, self.labels_layer)):
                self._repaint(event.box)
                t1 = time.perf_counter()
                self._refresh_points(edited_ids=tuple(event.ids), changed_ids=tuple(event.ids))
            self.last_timing.update(labels=t1 - t0, points=time.perf_counter() - t1)
            if self.points is not None:
                self.points.metadata[EDITED_KEY] = True
            self._update_undo_buttons()
            self._after_frame(self._update_counter)  # the review queue is rebuilt: ~1 ms for 1,000
        except Exception as exc:  # noqa: BLE001 - keep the editor usable; the edit itself is done and logged
            log.exception("cryoves editor: showing an edit failed")
            self._error(exc)

    def _hold_dock_paint(self) -> None:
        """Paint the dock after the canvas has shown the next frame (at the latest after 0.5 s).

        The widgets' values change at once (``status.value`` reads the new text); only their
        painting waits, so the frame that shows an edit is not delayed by a composition of the
        dock (see :meth:`_on_edit`).
        """
        if self._paint_held is not None:
            return
        native = getattr(getattr(getattr(self.viewer, "window", None), "_qt_viewer", None), "canvas", None)
        swapped = getattr(getattr(native, "native", None), "frameSwapped", None)
        if swapped is None or not self.isVisible():
            return  # no OpenGL widget signal to wait for (or nothing shown): paint as usual
        from qtpy.QtCore import QTimer

        self._paint_held = swapped
        self._hold_seq += 1
        seq = self._hold_seq
        self.setUpdatesEnabled(False)
        swapped.connect(self._release_dock_paint)
        QTimer.singleShot(500, lambda: self._release_dock_paint(seq))  # no frame came: paint anyway

    def _after_frame(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the canvas has shown the edit (at once when the dock paints as usual)."""
        if self._paint_held is None:
            fn()
        elif fn not in self._post_frame:
            self._post_frame.append(fn)

    def _release_dock_paint(self, seq: int | None = None) -> None:
        if self._paint_held is None or (seq is not None and seq != self._hold_seq):
            return  # released already (a timer of an earlier hold)
        swapped, self._paint_held = self._paint_held, None
        try:
            swapped.disconnect(self._release_dock_paint)
        except (TypeError, RuntimeError):  # already disconnected, or the canvas is gone
            pass
        todo, self._post_frame = self._post_frame, []
        for fn in todo:
            self._guard(fn)()
        try:
            self.setUpdatesEnabled(True)  # and a full repaint of the dock
        except RuntimeError:  # the widget was deleted meanwhile
            pass

    def _repaint(self, box) -> None:
        lab = self.labels_layer
        if lab is None or box is None:
            return
        if lab.data is not self.editor.labels:
            lab.data[box] = self.editor.labels[box]
        if self.viewer.dims.ndisplay == 2:
            z_axis = self.viewer.dims.not_displayed
            step = self.viewer.dims.current_step
            for ax in z_axis:
                s = box[ax]
                if not (s.start or 0) <= step[ax] < (s.stop if s.stop is not None else np.inf):
                    return  # the change is not on the displayed slice
        if not _repaint_region(lab, box):
            lab.refresh(thumbnail=False, extent=False, highlight=False)

    def _refresh_points(self, edited_ids=(), changed_ids=None) -> None:
        if self.points is None or self.editor is None:
            return
        self._syncing = True
        try:
            with self.editor.reading() as table:  # the editor's own table: no copy of 1,000s of rows
                update_points(self.points, table, edited_ids=edited_ids,
                              show_removed=bool(self.show_rejected.value), changed_ids=changed_ids)
                self._last_ids = table.ids.copy()
        finally:
            self._syncing = False
        ids = self._last_ids
        hits = np.flatnonzero(ids == self._selected_id) if self._selected_id is not None else []
        selected = {int(hits[0])} if len(hits) else set()
        if set(self.points.selected_data) != selected:
            self.points.selected_data = selected
        set_thick_slicing(self.viewer, self.points)

    def _update_undo_buttons(self) -> None:
        ed = self.editor
        self.undo_button.enabled = bool(ed is not None and ed.can_undo)
        self.redo_button.enabled = bool(ed is not None and ed.can_redo)

    def _update_labels_visibility(self, *_):
        """While editing, the label volume is shown only on demand ("Filled labels"): the outlines
        show every vesicle without covering its membrane, and with software OpenGL the labels
        slice is ~7 ms of CPU in every frame (docs/speed.md)."""
        lab = self.labels_layer
        if lab is not None and self.editor is not None:
            lab.visible = bool(self.show_labels.value)

    def _update_outline_width(self, *_):
        """Keep the outlines ``Outline (px)`` screen pixels wide at any zoom."""
        pts = self.points
        if pts is None or not len(pts.data):
            return
        zoom = float(_camera(self.viewer).zoom) or 1.0
        scale = abs(float(pts.scale[-1])) or 1.0
        width = float(self.outline_px.value) / (zoom * scale)
        current = np.asarray(pts.border_width, dtype=float)
        if (not pts.border_width_is_relative and len(current)
                and np.allclose(current, current[0]) and abs(current[0] - width) <= 0.1 * width):
            return  # within 10 %: not worth rewriting every point while the wheel zooms
        pts.border_width_is_relative = False
        pts.border_width = width

    def _update_text(self, *_):
        pts = self.points
        if pts is None:
            return
        if self.show_ids.value:
            pts.text = {"string": "{id}", "color": "#ffffff", "size": 9, "anchor": "upper_left"}
        pts.text.visible = bool(self.show_ids.value)

    # ------------------------------------------------------------------ napari's own Points tools
    def _on_points_mode(self, event=None):
        if self.points is not None and str(self.points.mode) == "add":
            from napari.utils.notifications import show_info

            self.points.mode = "pan_zoom"
            self.set_mode("add")
            show_info("cryoves: add vesicles with the editor's Add mode (press I), which fits the sphere")

    def _on_points_data(self, event=None) -> None:
        """Route napari's own add / delete / move of points through the editor (fit, log, undo)."""
        if self._syncing or self.editor is None:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("ING") or action in ("adding", "removing", "changing"):
            return
        pts = self.points
        ed = self.editor
        self._guard(lambda: self._route_points_edit(pts, ed))()
        self._refresh_points()

    def _route_points_edit(self, pts, ed) -> None:
        new = table_from_points(pts)
        old_ids = self._last_ids
        now = np.asarray(pts.features["id"], dtype=float) if "id" in pts.features and len(pts.features) == \
            len(pts.data) else np.full(len(pts.data), np.nan)
        # napari copies the last row's features into an added point: a repeated or missing id is new
        seen: set[int] = set()
        added = []
        kept: dict[int, int] = {}
        for i, v in enumerate(now):
            if not np.isfinite(v) or int(v) in seen or int(v) not in set(old_ids.tolist()):
                added.append(i)
                continue
            seen.add(int(v))
            kept[int(v)] = i
        removed = [int(v) for v in old_ids if int(v) not in kept]
        t = ed.table
        acc = np.asarray(t["status"]) == "accepted"
        removed = [v for v in removed if acc[np.flatnonzero(t.ids == v)[0]]]
        if removed:
            ed.remove(removed)
        for vid, i in kept.items():
            j = int(np.flatnonzero(t.ids == vid)[0])
            if not np.allclose(new.centers[i], t.centers[j], atol=1e-6):
                ed.move(vid, new.centers[i])
            elif not np.isclose(new.radii[i], t.radii[j]) and np.isfinite(new.radii[i]):
                ed.resize(vid, float(new.radii[i]))
        for i in added:
            try:
                ed.add_at(new.centers[i])
            except ValueError as exc:  # NoMembraneFound
                self.status.value = f"No membrane found where the point was added: {exc}"

    # ------------------------------------------------------------------ review
    def start_review(self) -> None:
        """Fill the review queue (worst first) and go to its first vesicle."""
        if self.editor is None:
            raise ValueError("press Start editing first")
        self._queue = [int(i) for i in self.editor.review_queue()]
        self._queue_pos = 0
        on = bool(self._queue)
        for w in (self.accept_button, self.reject_button, self.next_button):
            w.enabled = on
        self._update_counter()
        if not on:
            self.status.value = "Nothing left to review."
            return
        self._go_to_current()

    @property
    def current_review_id(self) -> int | None:
        if 0 <= self._queue_pos < len(self._queue):
            return self._queue[self._queue_pos]
        return None

    def _go_to_current(self) -> None:
        vid = self.current_review_id
        if vid is None:
            for w in (self.accept_button, self.reject_button, self.next_button):
                w.enabled = False
            self.status.value = "End of the review queue."
            return
        row = self._row(vid)
        shown = ""
        if row.get("status") == "removed" and not self.show_rejected.value:
            # a candidate the pipeline removed is judged with its sphere drawn: show the rejected ones
            self.show_rejected.value = True
            shown = " (rejected spheres now shown in red)"
        self.go_to(vid)
        p = row.get("pvalue", np.nan)
        self.status.value = (f"Vesicle {vid} ({self._queue_pos + 1} of {len(self._queue)} in the queue): radius "
                             f"{row['radius'] * self._vs:.1f} nm" + (f", p = {p:.3g}" if np.isfinite(p) else "")
                             + (f", {row['note']}" if row.get("note") else "")
                             + (", removed by the pipeline" if row.get("status") == "removed" else "") + shown
                             + ".  A accept, R reject, N next")

    def go_to(self, vid: int) -> None:
        """Centre and zoom the 2D view on vesicle ``vid`` (its central slice)."""
        row = self._row(vid)
        c = np.array([row["z"], row["y"], row["x"]], float)
        world = np.asarray(self._tomo_layer.data_to_world(c), float)
        dims = self.viewer.dims
        if dims.ndisplay != 2:
            dims.ndisplay = 2
        zaxis = dims.not_displayed[0] if dims.not_displayed else 0
        dims.set_point(zaxis, world[zaxis])
        cam = _camera(self.viewer)
        disp = list(dims.displayed)
        cam.center = tuple(world[disp])
        r_world = max(float(row["radius"]), 2.0) * self._vs
        canvas = self.viewer.window._qt_viewer.canvas.size if hasattr(self.viewer, "window") else (600, 600)
        px = float(min(canvas)) if canvas else 600.0
        cam.zoom = px / (8.0 * r_world)
        self.select(vid)

    def _verdict(self, verdict: str | None) -> None:
        vid = self.current_review_id
        if self.editor is None or vid is None:
            self.status.value = "Press Review queue first."
            return
        if verdict is not None:
            self.editor.set_reviewed(vid, verdict)
        self._queue_pos += 1
        self._update_counter()
        self._go_to_current()

    def review_accept(self):
        self._verdict("accepted")

    def review_reject(self):
        self._verdict("rejected")

    def review_next(self):
        self._verdict(None)

    def _update_counter(self) -> None:
        ed = self.editor
        if ed is None:
            return
        self.review_counter.value = ed.review_progress

    # ------------------------------------------------------------------ fine-tune
    def _results_folder(self) -> Path:
        if self._paths is None:
            raise ValueError("press Start editing first")
        return self._paths.folder

    def finetune(self) -> None:
        """Train the chosen U-Net for ``Minutes`` on this tomogram's corrected vesicles (worker thread)."""
        if self.editor is None:
            raise ValueError("press Start editing first")
        from cryoves.napari._service import run_in_tf_thread

        ed = self.editor
        mask = (np.asarray(ed.labels) != 0).astype(np.uint8)  # a snapshot: editing may go on meanwhile
        if not mask.any():
            raise ValueError("no accepted vesicle: nothing to learn from")
        tomo, vs = self._tomo, self._vs
        n_acc = int(np.sum(np.asarray(ed.table["status"]) == "accepted"))
        w = str(self.weights.value).strip()
        weights = None if w in ("", ".") else w
        seconds = float(self.minutes.value) * 60.0
        stem = self._results_folder() / f"{self._paths.stem}_finetuned"
        tomo_name = self._tomo_layer.name

        def train(progress):
            from cryoves._tf import import_tensorflow

            import_tensorflow()
            from cryoves.model import load_model
            from cryoves.train import TrainingParams, train_model, volume_pair

            model = load_model(weights)
            card = model.card
            vol = volume_pair(tomo, mask, vs, card.voxel_size_nm, card.preprocessing,
                              source=f"{tomo_name} (corrected in the cryoves editor)")
            patch = int(min(48, (min(vol.image.shape) // 4) * 4))
            params = TrainingParams(patch_size=patch, batch_size=2, epochs=100_000, steps_per_epoch=5,
                                    learning_rate=1e-4, n_validation_patches=8)
            t0 = time.monotonic()

            first_epoch = Path(str(stem) + ".weights.h5")
            if first_epoch.exists():  # an older fine-tuning of this tomogram: keep it aside
                first_epoch.replace(first_epoch.with_name(first_epoch.name.replace(
                    ".weights.h5", time.strftime(".%Y%m%d-%H%M%S.weights.h5"))))

            def prog(stage, done, total):
                elapsed = time.monotonic() - t0
                progress("fine-tune", int(min(elapsed, seconds)), int(seconds))  # raises Cancelled
                # the budget is soft: at least one epoch is completed (and its weights saved)
                if elapsed > seconds and first_epoch.exists():
                    raise _TimeUp()

            updates = {"name": f"{card.name}-finetuned", "source": f"fine-tuned from {card.name} by the cryoves editor",
                       "training_data": f"{card.training_data}; fine-tuned on {n_acc} corrected vesicles of "
                                        f"{tomo_name} ({vs:.3g} nm voxels)"}
            try:
                train_model([vol], model=model, params=params, out_stem=stem, card_updates=updates, progress=prog)
            except _TimeUp:
                pass
            if not first_epoch.is_file():
                raise ValueError(f"fine-tuning saved no weights in {first_epoch.parent}")
            return first_epoch

        def work(progress):
            return run_in_tf_thread(train, progress)

        def done(path):
            self._finetuned = Path(path)
            self.repredict_button.enabled = True
            return f"Fine-tuned weights saved: {path} (with its model card {Path(path).name[:-11]}.json)"

        self.runner.start(work, done, "Fine-tuning")

    def repredict(self) -> None:
        """Predict the probability map again with the fine-tuned weights (layer ``<tomo> probability``)."""
        if self._finetuned is None:
            raise ValueError("fine-tune first")
        from cryoves.napari._service import run_in_tf_thread

        path, tomo, vs = str(self._finetuned), self._tomo, self._vs
        tname = base_name(self._tomo_layer)

        def predict(progress):
            from cryoves._tf import import_tensorflow

            import_tensorflow()
            from cryoves.model import get_model
            from cryoves.pipeline import predict_stage

            # the same prediction as the Predict widget and the pipeline (with the large-vesicle pass)
            return predict_stage(tomo, vs, get_model(path), progress=progress)

        def work(progress):
            return run_in_tf_thread(predict, progress)

        def done(maps):
            from cryoves.napari._predict import show_prediction

            show_prediction(self.viewer, tname, vs, *maps)
            return ("Probability re-predicted with the fine-tuned weights; run 2. Threshold onward (your edited "
                    "vesicles layer is kept)")

        self.runner.start(work, done, "Re-prediction")


_GC_HOLDS = 0  # editors now editing (each holds the freeze of _GcHold)
_GC_OURS = False  # the freeze is ours (nothing else had frozen objects before)


class _GcHold:
    """While held, the objects that existed when the first hold began are out of the scans of
    Python's cyclic garbage collector (``gc.freeze``).

    A napari session holds several 100,000 objects; a full collection scans them all (0.1-0.35 s
    measured during the editor benchmark), and the collector starts one by itself now and then, in
    the middle of a click. Frozen, a collection scans only the objects made since. When the last
    hold is released the frozen objects are put back (a cycle among them that became garbage
    meanwhile is then collected as usual). Nothing is done when something else had frozen objects
    before (its freeze is left as it is). :meth:`release` may be called more than once.
    """

    def __init__(self):
        import gc

        global _GC_HOLDS, _GC_OURS
        self._held = True
        _GC_HOLDS += 1
        if _GC_HOLDS == 1 and gc.get_freeze_count() == 0:
            gc.collect()  # not to freeze garbage
            gc.freeze()
            _GC_OURS = True

    def release(self, *_) -> None:
        import gc

        global _GC_HOLDS, _GC_OURS
        if not self._held:
            return
        self._held = False
        _GC_HOLDS = max(0, _GC_HOLDS - 1)
        if _GC_HOLDS == 0 and _GC_OURS:
            gc.unfreeze()
            _GC_OURS = False


#: Qt's modifier keys -> their names in napari's key bindings (resolved on first use).
_MODIFIER_KEYS: dict[int, str] = {}


def _modifier_name(qt_key: int) -> str | None:
    if not _MODIFIER_KEYS:
        _MODIFIER_KEYS.update({int(Qt.Key.Key_Control): "Control", int(Qt.Key.Key_Shift): "Shift",
                               int(Qt.Key.Key_Alt): "Alt", int(Qt.Key.Key_Meta): "Meta"})
    return _MODIFIER_KEYS.get(int(qt_key))


def _napari_binds_modifier(viewer, name: str, held) -> bool:
    """Whether napari's key dispatch of the canvas would call something for the modifier key
    ``name`` pressed alone (with the modifiers ``held``, names as in vispy): a binding of that key
    combination, or a catch-all (``...``), in the user keymap or a keymap of the viewer or the
    active layer.

    The key binding is napari's own for such a vispy key event (``_vispy2appmodel``), looked up
    in the same keymaps as napari's dispatch, without building its whole active keymap (which
    hashes every binding of the viewer and the layer by its text: ~1 ms, done twice per key, as
    the canvas and its parent both dispatch a key nobody handled). When napari's internals are
    not as expected the answer is True: the key then goes to napari as usual.
    """
    try:
        from napari.utils.key_bindings import _get_user_keymap, _vispy2appmodel
        from vispy.app.canvas import KeyEvent
        from vispy.util import keys

        vkeys = {"Control": keys.CONTROL, "Shift": keys.SHIFT, "Alt": keys.ALT, "Meta": keys.META}
        handler = viewer.window._qt_viewer.canvas._key_map_handler
        kb = _vispy2appmodel(KeyEvent("key_press", key=vkeys[name],
                                      modifiers=tuple(v for n, v in vkeys.items() if n in held)))
        maps = [_get_user_keymap()]
        for provider in handler.keymap_providers:
            maps.append(provider.keymap)
            maps.extend(cls.class_keymap for cls in type(provider).__mro__ if hasattr(cls, "class_keymap"))
        return any(kb in m or ... in m for m in maps)
    except Exception:  # noqa: BLE001 - another napari: let it dispatch the key itself
        log.debug("cryoves editor: napari's keymaps not readable", exc_info=True)
        return True


class _BareModifierFilter(QObject):
    """Event filter of the canvas: a modifier key pressed or released alone (the Ctrl of Ctrl+Z)
    skips napari's key dispatch while editing, unless napari binds it.

    napari answers every key press on the canvas by building its active keymap, twice (the
    canvas and its parent widget both dispatch a key nobody handled): ~2 ms of the main thread
    per modifier key, i.e. 2 ms before an undo can start and 4 ms before a redo (Ctrl+Shift+Z).
    A modifier alone does nothing in napari unless a keymap binds it (e.g. Shift in a Shapes
    layer), so the filter keeps those from napari only when :func:`_napari_binds_modifier` says
    nothing would be called. The key combinations themselves (Ctrl+Z ...) are untouched; Qt
    gives every key event its modifiers, so shortcuts and napari's bindings still see them.
    """

    def __init__(self, widget: "EditorWidget"):
        super().__init__(widget)
        self._widget = widget

    def eventFilter(self, obj, ev):  # noqa: N802 - Qt API
        from qtpy.QtCore import QEvent

        if ev.type() not in (QEvent.Type.KeyPress, QEvent.Type.KeyRelease) or self._widget.editor is None:
            return False
        name = _modifier_name(ev.key())
        if name is None:
            return False
        mods = ev.modifiers()
        held = {n for n, m in (("Shift", Qt.KeyboardModifier.ShiftModifier),
                               ("Control", Qt.KeyboardModifier.ControlModifier),
                               ("Alt", Qt.KeyboardModifier.AltModifier),
                               ("Meta", Qt.KeyboardModifier.MetaModifier)) if mods & m}
        if _napari_binds_modifier(self._widget.viewer, name, held):
            return False
        ev.accept()
        return True


def software_gl_hint(tasks: str = "/proc/self/task", cpus: int | None = None) -> str:
    """A tip when napari draws with Mesa's software OpenGL (llvmpipe) on fewer threads than 2 x the CPUs ('' else).

    llvmpipe starts one rendering thread per CPU when the first OpenGL context is made (before any
    plugin is loaded; ``LP_NUM_THREADS`` overrides it). After the process was idle (a user aiming
    before a click) the kernel often runs both of those threads on one core for the first two
    frames, and whenever another process (even at ``nice 19``) holds a core they share the other
    one. On a 2-CPU machine (Xvfb, the editor benchmark's view) a redraw took ~22 ms in the first
    two frames after a pause and ~24 ms beside a ``nice 19`` job, ~17 ms with 4 threads in both
    cases (docs/speed.md). The running threads are counted (Linux: the names in ``tasks``), so the
    tip reflects the renderer actually in use; elsewhere it is ''.
    """
    try:
        threads = list(Path(tasks).iterdir())
    except OSError:  # not Linux, or /proc unreadable
        return ""
    n = 0
    for t in threads:
        try:
            n += (t / "comm").read_text().startswith("llvmpipe-")
        except OSError:  # a thread that ended meanwhile
            continue
    if cpus is None:  # the CPUs this process may use, as Mesa counts them
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n == 0 or n >= 2 * cpus:
        return ""
    return f"Tip: start napari with LP_NUM_THREADS={2 * cpus} (software OpenGL, {n} thread(s); docs/editor.md)."


def _mark_handled(event) -> None:
    """Mark a napari mouse event handled (vispy's scene then does not pick a visual for it)."""
    try:
        event.handled = True
    except Exception:  # noqa: BLE001 - a read-only event of another napari version: only slower
        pass


def _repaint_region(lab, box) -> bool:
    """Redraw only the part of the displayed labels slice inside ``box`` (2D view, plain labels).

    The labels layer's data is the editor's array, so the displayed slice (a view of it) already
    holds the new values; this converts the changed rectangle to texture values and sends it as
    napari's own partial ``labels_update`` (as its paint brush does), without re-slicing and
    re-uploading the whole plane. Returns False when that does not apply (then refresh fully).
    """
    try:
        if lab.contour or not isinstance(lab.data, np.ndarray) or lab._slice_input.ndisplay != 2:
            return False
        image = lab._slice.image
        disp = list(lab._slice_input.displayed)
        region = tuple(box[d] for d in disp)
        raw = image.raw
        if raw.ndim != 2 or not np.shares_memory(raw, lab.data):
            return False
        image.view[region] = lab.colormap._data_to_texture(raw[region])
        lab.events.labels_update(data=image.view[region], offset=tuple(int(r.start or 0) for r in region))
        return True
    except Exception:  # noqa: BLE001 - napari internals changed: fall back to a full refresh
        log.debug("cryoves editor: partial labels update unavailable", exc_info=True)
        return False


def _quiet_text(widget, lines: int) -> None:
    """Make a magicgui ``TextEdit`` a read-only, frameless status text ``lines`` lines high.

    A new text in a plain label re-lays out its parents up to the main window, one event-loop pass
    per level, and each pass makes Qt compose the whole window once more (tens of ms with software
    OpenGL) after every edit. A text edit of fixed height shows a new text (scrolling when it is
    long) without a layout pass.
    """
    widget.read_only = True
    edit = widget.native
    edit.setFrameShape(QFrame.NoFrame)
    edit.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    edit.setFocusPolicy(Qt.NoFocus)  # keys stay with the canvas
    edit.viewport().setAutoFillBackground(False)
    edit.setStyleSheet("background: transparent;")
    margin = 2 * edit.document().documentMargin()
    edit.setFixedHeight(int(lines * edit.fontMetrics().lineSpacing() + margin + 2))


def _fix_size(label, longest: str) -> None:
    """A fixed size that holds ``longest``: its text changes then re-lay out nothing (see :func:`_quiet_text`)."""
    hint = label.sizeHint()
    label.setFixedSize(max(hint.width(), label.fontMetrics().horizontalAdvance(longest) + 8), hint.height())


def _section(title: str) -> QWidget:
    lab = Label(value=f"<b>{title}</b>")
    return lab.native


def _ids_text(ids) -> str:
    ids = list(ids)
    if len(ids) <= 5:
        return ", ".join(str(i) for i in ids)
    return ", ".join(str(i) for i in ids[:5]) + f" … ({len(ids)} vesicles)"
