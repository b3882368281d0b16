"""Locate files shipped with cryoves: the sample data and the default weights.

In a wheel (``pip install .``) they are inside the package (``cryoves/_sample_data``,
``cryoves/_weights``, copied by hatchling's force-include). In an editable install
(``pip install -e .``) the same names are symlinks to the repository's top-level
``sample_data/`` and ``weights/``. Both resolve through the package directory, so
neither needs the network nor the current working directory.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _existing(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent.parent / name.lstrip("_")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cryoves data folder {name!r} not found next to {_PKG}; the installation is incomplete "
        "(reinstall with pip install cryoves)")


def sample_data_dir() -> Path:
    """Folder with the bundled simulated sample tomogram and its ground truth."""
    return _existing("_sample_data")


def weights_dir() -> Path:
    """Folder with the default U-Net weights and their model card."""
    return _existing("_weights")


def manifest_path() -> Path:
    """The npe2 manifest ``napari.yaml``."""
    p = _PKG / "napari.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"napari.yaml not found in {_PKG}")
    return p
