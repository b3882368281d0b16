"""cryoves: find, fit and fix synaptic vesicles in cryo-electron tomograms.

The core (this package minus :mod:`cryoves.napari`) needs no Qt and no napari.
Arrays are (Z, Y, X); lengths in the API are in nm unless a name says ``_vox``.
"""

__version__ = "0.1.0"

from cryoves.table import VesicleTable, render_labels  # noqa: E402
from cryoves._progress import Cancelled  # noqa: E402

__all__ = ["VesicleTable", "render_labels", "Cancelled", "__version__"]
