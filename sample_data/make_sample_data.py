"""Regenerate the bundled sample data exactly (see README.md in this folder).

Run from the repository root::

    python sample_data/make_sample_data.py [OUTDIR]

OUTDIR defaults to this folder. The tomogram is stored as 8-bit MRC (mode 0, int8,
scaled linearly so that the 0.01 and 99.99 percentiles map to -128 and 127), the labels
and the mask as 8-bit MRC (mode 0; values 0..N and 0/1), all with the voxel size in the
header (Angstrom).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cryoves import __version__
from cryoves import io as cio
from cryoves.cli.simulate import simulation_record
from cryoves.simulate import SimulationParams, simulate_tomogram

SHAPE = (76, 160, 160)
PARAMS = SimulationParams(voxel_size=2.0, seed=2024, n_vesicles=55)


def to_int8(tomo: np.ndarray) -> np.ndarray:
    """Scale linearly so the 0.01 / 99.99 percentiles map to -128 / 127, then clip."""
    lo, hi = np.percentile(tomo, [0.01, 99.99])
    scaled = (tomo.astype(np.float64) - lo) / (hi - lo) * 255.0 - 128.0
    return np.clip(np.round(scaled), -128, 127).astype(np.int8)


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    sim = simulate_tomogram(shape=SHAPE, params=PARAMS)
    v = sim.voxel_size
    if len(sim.table) > 127:
        raise SystemExit("more than 127 vesicles do not fit in 8-bit labels")
    # every file through cryoves.io: atomic, voxel size in the header; regenerating replaces them
    cio.write_mrc(outdir / "tomogram.mrc", to_int8(sim.tomogram), v, overwrite=True)
    cio.write_mrc(outdir / "labels_truth.mrc", sim.labels.astype(np.int8), v, overwrite=True)
    cio.write_mrc(outdir / "mask.mrc", sim.mask.astype(np.int8), v, overwrite=True)
    cio.write_vesicles_csv(outdir / "vesicles_truth.csv", sim.table, overwrite=True)
    meta = simulation_record(sim, f"cryoves {__version__}: python sample_data/make_sample_data.py",
                             tomogram_storage="int8 (MRC mode 0), linear scaling of the float32 simulation: "
                                              "0.01/99.99 percentiles -> -128/127")
    cio.atomic_write_text(outdir / "params.json", json.dumps(meta, indent=2) + "\n", overwrite=True)
    print(f"{len(sim.table)} vesicles -> {outdir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
