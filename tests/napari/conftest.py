"""Fixtures of the napari plugin tests (``python -m pytest tests/napari``; pytest-xvfb provides the display).

The widget tests work on a crop of the bundled sample tomogram so they stay fast on two CPU
cores; the post-processing widgets get a probability map derived from the ground truth (a
smoothed vesicle mask), because the network is not what they test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_helpers import REFERENCE_WEIGHTS, crop_box, gt_probability, truth_in_crop  # noqa: E402


def _display_ok() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pytest_collection_modifyitems(config, items):
    if _display_ok():
        return
    skip = pytest.mark.skip(reason="napari needs a display: install pytest-xvfb and Xvfb (bash .ci/setup)")
    for item in items:
        if "tests/napari" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample data folder (tomogram, ground truth)."""
    from cryoves._resources import sample_data_dir

    d = sample_data_dir()
    missing = [n for n in ("tomogram.mrc", "labels_truth.mrc", "vesicles_truth.csv") if not (d / n).is_file()]
    if missing:
        pytest.fail(f"bundled sample data incomplete, missing {missing} in {d}")
    return d


@pytest.fixture(scope="session")
def sample(sample_dir):
    """(tomogram, truth labels, truth table, voxel size) of the bundled sample, in memory."""
    from cryoves.io import read_labels, read_tomogram, read_vesicles_csv

    tomo, vs = read_tomogram(sample_dir / "tomogram.mrc", mmap=False)
    labels, _ = read_labels(sample_dir / "labels_truth.mrc")
    table = read_vesicles_csv(sample_dir / "vesicles_truth.csv")
    return tomo, labels, table, vs


@pytest.fixture(scope="session")
def crop(sample):
    """Dict with a crop of the sample: tomogram, truth labels, GT-derived probability, table."""
    tomo, labels, table, vs = sample
    box = crop_box(tomo.shape, table)
    t = np.ascontiguousarray(tomo[box])
    lab = np.ascontiguousarray(labels[box])
    prob = gt_probability(lab)
    origin = np.array([s.start for s in box], float)
    tab = table.copy()
    for ax, name in enumerate("zyx"):
        tab[name] = tab[name] - origin[ax]
    full_inside = truth_in_crop(table, box, tomo.shape)
    return {"tomogram": t, "labels": lab, "probability": prob, "voxel_size": vs, "box": box,
            "table": tab, "n_truth_strict": int(full_inside.sum()),
            "n_truth_any": int(len(np.unique(lab)) - 1)}


@pytest.fixture
def weights_path():
    """Weights for the network tests: the default ones, else the CryoVesNet reference, else skip."""
    from cryoves.model import default_weights_path

    try:
        return str(default_weights_path())
    except FileNotFoundError:
        pass
    if REFERENCE_WEIGHTS.is_file():
        return str(REFERENCE_WEIGHTS)
    pytest.skip("no U-Net weights: neither default weights nor ../shared/reference")


