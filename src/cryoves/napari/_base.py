"""Building blocks of the cryoves dock widgets: layout, layer pickers, parameter fields."""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from cryoves.napari._layers import ROLE_KEY, TOMO_KEY, base_name, layer_name, voxel_size_of
from cryoves.napari._runner import TaskRunner

__all__ = ["StageWidget", "default_of", "float_field", "optional_checkbox", "tomogram_array", "materialize",
           "check_probability"]

#: Roles of layers that are never a tomogram (not listed in the tomogram pickers).
NOT_TOMOGRAM = ("probability", "probability_large")


def default_of(func: Callable, name: str):
    """Default value of parameter ``name`` of ``func`` (so widgets share the core's defaults)."""
    return inspect.signature(func).parameters[name].default


def float_field(label: str, value: float, tooltip: str, *, min: float = 0.0, max: float = 1000.0,
                step: float = 0.1, decimals: int = 2, name: str | None = None) -> FloatSpinBox:
    """A float spin box with a label and a tooltip (units in both)."""
    w = FloatSpinBox(value=float(value), min=min, max=max, step=step, label=label, tooltip=tooltip,
                     name=name)
    w.native.setDecimals(decimals)
    return w


class StageWidget(QWidget):
    """Common frame of a cryoves dock widget.

    Layout, top to bottom: ``self.main`` (layer pickers and main parameters), the subclass's
    :meth:`extra_widgets` (plots, tables), an *Advanced parameters* collapsible section
    (``self.advanced``, only if a subclass fills it), the action buttons (``run_button``, any
    ``extra_buttons``) with *Cancel*, a progress bar and a one-line status. Long work runs through
    ``self.runner`` (:class:`~cryoves.napari._runner.TaskRunner`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).
    """

    #: Title of the dock widget (as in the manifest).
    display_name = "cryoves"
    #: Text of the main action button.
    run_text = "Run"

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821 - napari injects it
        super().__init__()
        self.viewer = napari_viewer
        self.closed = False
        self._had_parent = False
        self._combos: list[ComboBox] = []
        self.main = Container(labels=True)
        self.advanced = Container(labels=True)
        self.run_button = PushButton(text=self.run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="Stop the running computation (nothing is changed)")
        self.progress_bar = ProgressBar(value=0, min=0, max=0, visible=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extra_buttons: list[PushButton] = []
        self.fields: dict = {}
        self.build()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(2)
        layout.addWidget(self.main.native)
        for w in self.extra_widgets():
            layout.addWidget(w)
        if len(self.advanced):
            from superqt import QCollapsible

            self._collapsible = QCollapsible("Advanced parameters")
            self._collapsible.addWidget(self.advanced.native)
            layout.addWidget(self._collapsible)
        buttons = Container(widgets=[self.run_button, *self.extra_buttons, self.cancel_button],
                            layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        layout.addWidget(buttons.native)
        layout.addWidget(self.progress_bar.native)
        layout.addWidget(self.status.native)
        layout.addStretch(1)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        self.runner = TaskRunner([self.run_button, *self.extra_buttons], self.cancel_button,
                                 self.progress_bar, self.status)
        self.run_button.changed.connect(self.guarded(self.run))
        self.reset_choices()

    # -- closing -----------------------------------------------------------------------
    def event(self, ev):
        from qtpy.QtCore import QEvent

        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._had_parent = True
            elif self._had_parent:  # taken out of its dock: napari closed the dock widget
                self.close_down()
        return super().event(ev)

    def closeEvent(self, ev):  # noqa: N802 - Qt name
        self.close_down()
        super().closeEvent(ev)

    def close_down(self) -> None:
        """The dock was closed: cancel the running task (its result is dropped) and clean up."""
        if self.closed:
            return
        self.closed = True
        self.runner.shutdown()
        self.on_close()

    def on_close(self) -> None:
        """Subclass hook: undo what the widget shows in the viewer (previews)."""

    def guarded(self, action: Callable[[], None]) -> Callable:
        """A button handler that runs ``action`` and turns invalid input into a one-line message."""
        def clicked(*_):
            if self.closed:
                return
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - invalid input: clear message, no traceback
                from napari.utils.notifications import show_error

                from cryoves.napari._runner import describe_error

                msg = describe_error(exc)
                self.status.value = msg
                show_error(f"cryoves: {msg}")

        return clicked

    def add_fields(self, stage: str) -> None:
        """Add the shared parameter fields of ``stage`` (see :mod:`cryoves.napari._params`)."""
        from cryoves.napari._params import STAGE_FIELDS, make_field

        main, advanced = STAGE_FIELDS[stage]
        for names, container in ((main, self.main), (advanced, self.advanced)):
            for name in names:
                if name not in self.fields:
                    self.fields[name] = make_field(name)
                    container.append(self.fields[name])

    def params(self):
        """:class:`cryoves.pipeline.SegmentParams` with this widget's field values."""
        from cryoves.napari._params import params_from

        return params_from(self.fields)

    # -- subclass hooks ------------------------------------------------------------------
    def build(self) -> None:
        """Create the widgets (append to ``self.main`` / ``self.advanced``)."""

    def extra_widgets(self) -> Sequence[QWidget]:
        """Extra Qt widgets placed above the buttons (plots, tables)."""
        return ()

    def run(self) -> None:
        """Start the stage (called by the main button)."""
        raise NotImplementedError

    # -- layer pickers ---------------------------------------------------------------------
    def layer_combo(self, label: str, layer_type: str, tooltip: str, *, roles: Sequence[str] = (),
                    exclude_roles: Sequence[str] = (), nullable: bool = False, name: str | None = None
                    ) -> ComboBox:
        """A combo box listing the viewer's layers of ``layer_type``.

        ``roles`` are preferred in this order when choosing the default (matching the selected
        tomogram); ``exclude_roles`` are not listed.
        """
        import napari.layers

        cls = getattr(napari.layers, layer_type)

        def choices(_widget=None):
            out = []
            for layer in self.viewer.layers:
                if isinstance(layer, cls) and layer.metadata.get(ROLE_KEY) not in exclude_roles:
                    out.append((layer.name, layer))
            return out

        combo = ComboBox(label=label, choices=choices, tooltip=tooltip, nullable=nullable, name=name)
        combo._cryoves_roles = tuple(roles)
        self._combos.append(combo)
        return combo

    def tomogram_combo(self) -> ComboBox:
        """The tomogram picker (every widget's first layer picker; probability maps not listed)."""
        combo = self.layer_combo("Tomogram", "Image", "The tomogram (membranes dark)",
                                 exclude_roles=NOT_TOMOGRAM)
        combo.changed.connect(self.autoselect)
        return combo

    def reset_choices(self, *_):
        """Refresh every layer picker (napari calls this when layers change)."""
        if self.closed:
            return
        for w in (self.main, self.advanced):
            w.reset_choices()
        self.autoselect()

    def tomogram_name(self) -> str | None:
        """Name of the tomogram the widget works on (from its first layer picker)."""
        if not self._combos or self._combos[0].value is None:
            return None
        return base_name(self._combos[0].value)

    def autoselect(self, *_):
        """Pre-select, in every picker with preferred roles, the layer of the current tomogram."""
        tomo = self.tomogram_name()
        if tomo is None:
            return
        for combo in self._combos[1:]:
            roles = getattr(combo, "_cryoves_roles", ())
            if not roles:
                continue
            layers = [c for c in combo.choices if c is not None]
            best = None
            for role in roles:
                for layer in layers:
                    if layer.name == layer_name(tomo, role) or (
                            layer.metadata.get(ROLE_KEY) == role and layer.metadata.get(TOMO_KEY) == tomo):
                        best = layer
                        break
                if best is not None:
                    break
            if best is not None and combo.value is not best:
                combo.value = best

    # -- helpers -------------------------------------------------------------------------
    def require(self, combo: ComboBox, what: str):
        """The layer chosen in ``combo``, or a ValueError that says what is missing."""
        layer = combo.value
        if layer is None:
            raise ValueError(f"no {what} layer: {self.missing_hint(what)}")
        return layer

    def missing_hint(self, what: str) -> str:
        return "open or create one first"

    def voxel_size_from(self, layer, field: FloatSpinBox | None = None) -> float:
        """The voxel size to use: the widget's field if given, else the layer's; must be known."""
        vs = float(field.value) if field is not None else voxel_size_of(layer)
        if vs is None or not np.isfinite(vs) or vs <= 0:
            raise ValueError(
                f"the voxel size of layer {layer.name!r} is unknown: enter it (nm) in the Predict "
                "widget, or open the tomogram from an MRC file whose header has it")
        from cryoves.validate import check_voxel_size

        return check_voxel_size(vs, name=f"the voxel size of layer {layer.name!r}")


def tomogram_array(layer) -> np.ndarray:
    """The (highest resolution) 3-D data of an image layer; a clear error if it is not 3-D."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"layer {layer.name!r} is {data.ndim}-D; cryoves needs a 3-D volume (Z, Y, X)")
    return data


def materialize(data) -> np.ndarray:
    """A numpy array (computes a lazy dask array; memory maps stay memory maps). Worker thread only."""
    if hasattr(data, "compute") and not isinstance(data, np.ndarray):
        return np.asarray(data.compute())
    return data


def check_probability(layer) -> np.ndarray:
    """The data of ``layer`` if it is a probability map, else a ValueError that says why not.

    A probability map is a layer written by Predict (role ``"probability"`` or
    ``"probability_large"``) or any 3-D image whose values lie in [0, 1] (e.g. a map opened
    from a file); a tomogram is refused at once.
    """
    data = tomogram_array(layer)
    role = layer.metadata.get(ROLE_KEY)
    if role in NOT_TOMOGRAM:
        return data
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"layer {layer.name!r} is not a probability map: its values lie in "
                         f"{lo:.3g}..{hi:.3g}, not 0..1 (choose the output of Predict)")
    return data


def optional_checkbox(text: str, value: bool, tooltip: str) -> CheckBox:
    """A check box whose text is its label (no separate label column)."""
    return CheckBox(text=text, value=value, tooltip=tooltip, label="")
