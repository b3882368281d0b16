"""``cryoves simulate``: write a simulated tomogram with its ground truth to a folder.

Files written (atomically: temporary file in the same folder, then ``os.replace``):

- ``tomogram.mrc``  float32, voxel size in the header (Angstrom, as MRC requires)
- ``labels.mrc``    uint16 vesicle labels (filled spheres of outer radius)
- ``mask.mrc``      8-bit (mode 0) region mask (1 = presynaptic cytoplasm around the cluster)
- ``vesicles.csv``  the true vesicle table, voxels and nm
- ``params.json``   every simulation parameter, the shape and the cryoves version
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from cryoves.cli import CliError

OUTPUT_FILES = ("tomogram.mrc", "labels.mrc", "mask.mrc", "vesicles.csv", "params.json")

#: columns of vesicles.csv, in order: ``VesicleTable.to_dict(nm=True)`` (the format of
#: ``cryoves.io.write_vesicles_csv``)
CSV_COLUMNS = ("id", "z", "y", "x", "radius", "thickness", "density", "pvalue", "stage", "status",
               "note", "reviewed", "z_nm", "y_nm", "x_nm", "radius_nm", "thickness_nm", "voxel_size_nm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``simulate`` on the ``cryoves`` sub-command parser."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate a tomogram of a presynaptic terminal with ground-truth vesicles",
        description=("Simulate a cryo-electron tomogram (phantom -> tilt series -> CTF -> noise -> "
                     "weighted back-projection) with its ground truth, and write tomogram.mrc, "
                     "labels.mrc, mask.mrc, vesicles.csv and params.json to OUTDIR."))
    p.add_argument("outdir", metavar="OUTDIR", help="output folder (created if missing)")
    p.add_argument("--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), default=None,
                   help="volume shape in voxels (default 128 256 256)")
    p.add_argument("--voxel-size", type=float, default=None, metavar="NM",
                   help="voxel size in nm (default 1.5)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (default 0)")
    p.add_argument("--snr", type=float, default=None, metavar="X",
                   help="projection SNR (Gaussian noise); default: Poisson noise from --dose")
    p.add_argument("--dose", type=float, default=None, metavar="E_PER_A2",
                   help="total electron dose of the tilt series in e/A^2 (default 100)")
    p.add_argument("--defocus", type=float, default=None, metavar="UM",
                   help="defocus in micrometres, negative = underfocus (default -8)")
    p.add_argument("--tilt-range", type=float, default=None, metavar="DEG",
                   help="maximum tilt angle; the series spans -DEG..+DEG (default 60)")
    p.add_argument("--tilt-step", type=float, default=None, metavar="DEG",
                   help="tilt increment in degrees (default 2)")
    p.add_argument("--n-vesicles", type=int, default=None, metavar="N",
                   help="number of synaptic vesicles (default: from the volume)")
    p.add_argument("--params", default=None, metavar="JSON",
                   help="a params.json (from a previous run) to start from; options given "
                        "on the command line override it")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUTDIR, replacing the files")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _temp_name(path: Path) -> str:
    """A fresh temporary name next to ``path`` (same folder, so ``os.replace`` is atomic)."""
    return str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_mrc(path: Path, data: np.ndarray, voxel_size: float) -> None:
    """Write ``data`` as MRC atomically; voxel size in nm -> header in Angstrom.

    Private stop-gap until ``cryoves.io.write_mrc`` exists.
    """
    import mrcfile

    path = Path(path)
    tmp = _temp_name(path)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data))
            mrc.voxel_size = float(voxel_size) * 10.0
            mrc.update_header_stats()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "x", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def vesicles_csv_text(table) -> str:
    """The vesicle table as CSV text: every column of ``table.to_dict(nm=True)``.

    Floats are written with full precision (``repr``), the same format as
    ``cryoves.io.write_vesicles_csv``, so ``cryoves.io.read_vesicles_csv`` gives back the
    same table.
    """
    import io

    cols = table.to_dict(nm=True)
    names = list(cols)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for i in range(len(table)):
        row = []
        for name in names:
            val = cols[name][i]
            if isinstance(val, (float, np.floating)):
                row.append(repr(float(val)))
            elif isinstance(val, (int, np.integer)):
                row.append(str(int(val)))
            else:
                row.append(str(val))
        w.writerow(row)
    return buf.getvalue()


def _progress_printer(quiet: bool):
    if quiet:
        return None
    start = time.time()
    last = {"stage": None}

    def progress(stage, done, total):
        if stage != last["stage"] or done == total:
            last["stage"] = stage
            print(f"  [{time.time() - start:6.1f} s] {stage} {done}/{total}", file=sys.stderr, flush=True)
    return progress


def run(args) -> int:
    """Run ``cryoves simulate``; returns the exit status."""
    from cryoves import __version__
    from cryoves.simulate import SimulationParams, simulate_tomogram

    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise CliError(f"{outdir} exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not args.overwrite:
        raise CliError(f"{outdir} is not empty; choose another folder or pass --overwrite")
    base = {}
    loaded = {}
    if args.params:
        try:
            with open(args.params) as fh:
                loaded = json.load(fh)
        except (OSError, ValueError) as err:
            raise CliError(f"cannot read --params {args.params}: {err}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"--params {args.params} does not hold a JSON object")
        base = dict(loaded.get("params", loaded))
    shape = tuple(args.shape) if args.shape is not None else tuple(loaded.get("shape", (128, 256, 256)))
    if len(shape) != 3 or min(shape) < 16:
        raise CliError(f"--shape must be three sizes of at least 16 voxels, got {shape}")
    overrides = {}
    for opt, name in (("voxel_size", "voxel_size"), ("seed", "seed"), ("snr", "snr"), ("dose", "dose"), ("defocus", "defocus_um"),
                      ("tilt_range", "tilt_range"), ("tilt_step", "tilt_step"),
                      ("n_vesicles", "n_vesicles")):
        val = getattr(args, opt)
        if val is not None:
            overrides[name] = val
    base.update(overrides)
    try:
        params = SimulationParams.from_dict(base)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from None

    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        sim = simulate_tomogram(shape=shape, params=params, progress=_progress_printer(args.quiet))
    except ValueError as err:
        raise CliError(str(err)) from None
    elapsed = time.time() - t0

    from cryoves import io as cio

    v = sim.voxel_size
    ow = True  # the folder was checked above: empty, or --overwrite given
    cio.write_mrc(outdir / "tomogram.mrc", sim.tomogram.astype(np.float32), v, overwrite=ow)
    cio.write_labels_mrc(outdir / "labels.mrc", sim.labels, v, overwrite=ow)
    # 0/1 mask as 8-bit MRC (mode 0)
    cio.write_mrc(outdir / "mask.mrc", sim.mask.astype(np.int8), v, overwrite=ow)
    cio.write_vesicles_csv(outdir / "vesicles.csv", sim.table, overwrite=ow)
    meta = {
        "generator": f"cryoves {__version__} simulate",
        "shape": list(shape),
        "voxel_size_nm": v,
        "n_vesicles": len(sim.table),
        "n_vesicles_requested": sim.n_requested,
        "tilt_angles_deg": [float(a) for a in sim.tilt_angles],
        "seconds": round(elapsed, 2),
        "params": sim.params.to_dict(),
    }
    _write_text(outdir / "params.json", json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        print(f"simulated {shape} at {v} nm with {len(sim.table)} vesicles in {elapsed:.1f} s -> {outdir}")
    return 0
