"""Sample data for File > Open Sample: the bundled simulated synapse tomogram.

Two entries: the tomogram alone, and the tomogram with its ground truth (vesicle labels
and the true spheres as a Points layer, hidden at first so they do not give the answer
away). The files come from ``cryoves._resources.sample_data_dir()``; no network.
"""

from __future__ import annotations

from cryoves.napari._layers import layer_name, labels_kwargs, points_layer_data

__all__ = ["sample_tomogram", "sample_tomogram_with_truth", "SAMPLE_NAME"]

SAMPLE_NAME = "sample tomogram"


def _sample_file(name: str):
    from cryoves._resources import sample_data_dir

    path = sample_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"the cryoves sample file {path} is missing; the installation is incomplete "
            "(reinstall cryoves, or regenerate it with `cryoves simulate`)")
    return path


def sample_tomogram() -> list[tuple]:
    """The simulated synapse tomogram (voxel size from its header)."""
    from cryoves.napari._reader import read_mrc

    data, kw, ltype = read_mrc(str(_sample_file("tomogram.mrc")))[0]
    kw["name"] = SAMPLE_NAME
    kw["metadata"]["cryoves_tomogram"] = SAMPLE_NAME
    return [(data, kw, ltype)]


def sample_tomogram_with_truth() -> list[tuple]:
    """The simulated tomogram plus its ground truth (labels and true spheres, hidden)."""
    from cryoves.io import read_labels, read_vesicles_csv

    layers = sample_tomogram()
    data, kw, _ = layers[0]
    vs = kw["metadata"]["voxel_size_nm"]
    truth, _ = read_labels(_sample_file("labels_truth.mrc"), check_shape=data.shape)
    truth_kw = labels_kwargs(vs, layer_name(SAMPLE_NAME, "truth_labels"), "truth_labels", SAMPLE_NAME,
                             visible=False)
    layers.append((truth, truth_kw, "labels"))
    table = read_vesicles_csv(_sample_file("vesicles_truth.csv"), voxel_size=vs)
    pts = points_layer_data(table, SAMPLE_NAME, data.shape, role="truth_vesicles")
    pts[1]["visible"] = False
    layers.append(pts)
    return layers
