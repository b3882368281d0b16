"""The weights / voxel-size panel shared by the Predict and Find vesicles widgets.

Four rows: the weights file (empty = the default weights), what those weights are (name and
training voxel size), the tomogram's voxel size (read from the layer, editable) and the rescale
factor applied for prediction. Wired once here; a widget adds :attr:`WeightsPanel.widgets` to
its layout.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import FileEdit, Label

from cryoves.napari._base import float_field
from cryoves.napari._layers import VOXEL_KEY, voxel_size_of
from cryoves.napari._service import describe_weights, weights_path

__all__ = ["WeightsPanel"]


class WeightsPanel:
    """Weights file, its description, the tomogram's voxel size and the rescale factor.

    Parameters
    ----------
    tomogram : magicgui ComboBox
        The widget's tomogram picker: its layer's voxel size fills the voxel-size field.
    """

    def __init__(self, tomogram):
        self.tomogram = tomogram
        self.weights = FileEdit(mode="r", filter="*.h5", value="", label="Weights",
                                tooltip="U-Net weights file. Empty: the default weights shipped with cryoves. "
                                        "Accepts cryoves NAME.weights.h5 (+ NAME.json card) and the "
                                        "reference CryoVesNet weights.h5.")
        self.weights_label = Label(value="")
        self.weights_label.native.setWordWrap(True)
        self.voxel_size = float_field(
            "Voxel size (nm)", 1.0, "Voxel size of the tomogram in nm, read from the MRC header. Correct it "
            "here if the header is wrong; the tomogram is rescaled to the model's training voxel size.",
            min=0.01, max=100.0, step=0.01, decimals=3)
        self.rescale_label = Label(value="")
        self.rescale_label.native.setWordWrap(True)
        #: Training voxel size (nm) of the chosen weights; None if they cannot be used.
        self.model_voxel_size: float | None = None
        self.unknown = False  # the tomogram's voxel size is unknown and not typed yet
        self._setting = False
        tomogram.changed.connect(self.refresh)
        self.weights.changed.connect(self._weights_changed)
        self.voxel_size.changed.connect(self._voxel_size_edited)
        self._weights_changed()

    @property
    def widgets(self) -> list:
        """The panel's rows, in layout order."""
        return [self.weights, self.weights_label, self.voxel_size, self.rescale_label]

    def path(self) -> str | None:
        """The chosen weights file (None: the default weights)."""
        return weights_path(self.weights.value)

    # -- updates -------------------------------------------------------------------------
    def _weights_changed(self, *_):
        self.model_voxel_size, self.weights_label.value = describe_weights(self.path())
        self._show_rescale()

    def refresh(self, *_):
        """Read the voxel size of the chosen tomogram layer into the field."""
        layer = self.tomogram.value
        if layer is None:
            return
        vs = voxel_size_of(layer)
        self.unknown = vs is None
        if vs is not None and not np.isclose(vs, self.voxel_size.value):
            self._setting = True
            try:
                self.voxel_size.value = vs
            finally:
                self._setting = False
        self._show_rescale()

    def _voxel_size_edited(self, *_):
        if not self._setting:
            self.unknown = False  # the user typed it
        self._show_rescale()

    def _show_rescale(self):
        if self.unknown:
            self.rescale_label.value = "⚠ The voxel size of this tomogram is unknown: enter it above (nm)."
        elif self.model_voxel_size is None:
            self.rescale_label.value = ""
        else:
            f = float(self.voxel_size.value) / self.model_voxel_size
            self.rescale_label.value = (f"Model voxel size {self.model_voxel_size:.2f} nm → tomogram rescaled "
                                        f"by ×{f:.3f} for prediction")

    # -- checks before a run ------------------------------------------------------------
    def require_weights(self) -> str | None:
        """The weights path; a ValueError saying why if the weights cannot be used."""
        if self.model_voxel_size is None:
            raise ValueError(self.weights_label.value or "choose a weights file")
        return self.path()

    def voxel_size_for(self, layer) -> float:
        """The voxel size (nm) to use for ``layer``; a ValueError if it is unknown."""
        if self.unknown:
            raise ValueError(f"the voxel size of {layer.name!r} is unknown (no usable value in the MRC header): "
                             "enter it in nm in 'Voxel size (nm)'")
        from cryoves.validate import check_voxel_size

        return check_voxel_size(self.voxel_size.value, name="'Voxel size (nm)'")

    @staticmethod
    def record(layer, vs: float) -> None:
        """Write an edited voxel size onto the tomogram layer (scale, units and metadata)."""
        old = voxel_size_of(layer)
        if old is None or not np.isclose(old, vs):
            layer.metadata[VOXEL_KEY] = float(vs)
            layer.scale = (float(vs),) * layer.ndim
            try:
                layer.units = ("nm",) * layer.ndim
            except Exception:  # noqa: BLE001 - older napari without units
                pass
