"""``cryoves simulate``: write a simulated tomogram with its ground truth to a folder.

Files written by :mod:`cryoves.io` (atomically: temporary file in the same folder, then
``os.replace``):

- ``tomogram.mrc``  float32, voxel size in the header (Angstrom, as MRC requires)
- ``labels.mrc``    uint16 vesicle labels (filled spheres of outer radius)
- ``mask.mrc``      8-bit (mode 0) region mask (1 = presynaptic cytoplasm around the cluster)
- ``vesicles.csv``  the true vesicle table, voxels and nm
- ``params.json``   every simulation parameter, the shape and the cryoves version
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cryoves.cli import CliError

#: columns of vesicles.csv, in order: ``VesicleTable.to_dict(nm=True)`` (the format of
#: ``cryoves.io.write_vesicles_csv``)
CSV_COLUMNS = ("id", "z", "y", "x", "radius", "thickness", "density", "pvalue", "stage", "status",
               "note", "reviewed", "z_nm", "y_nm", "x_nm", "radius_nm", "thickness_nm", "voxel_size_nm")


#: main simulation options: (flag, SimulationParams field, type or choices, metavar, help)
MAIN_OPTIONS = (
    ("--voxel-size", "voxel_size", float, "NM", "voxel size in nm (default 1.5)"),
    ("--seed", "seed", int, "N", "random seed (default 0)"),
    ("--snr", "snr", float, "X", "projection SNR (Gaussian noise); default: Poisson noise from --dose"),
    ("--dose", "dose", float, "E_PER_A2", "total electron dose of the tilt series in e/A^2 (default 100)"),
    ("--defocus", "defocus_um", float, "UM", "defocus in micrometres, negative = underfocus (default -8)"),
    ("--tilt-range", "tilt_range", float, "DEG", "maximum tilt angle; the series spans -DEG..+DEG (default 60)"),
    ("--tilt-step", "tilt_step", float, "DEG", "tilt increment in degrees (default 2)"),
    ("--n-vesicles", "n_vesicles", int, "N", "number of synaptic vesicles (default: from the volume)"),
)

#: simulator physics options, as :data:`MAIN_OPTIONS`
PHYSICS_OPTIONS = (
    ("--voltage", "voltage_kv", float, "KV", "acceleration voltage in kV (default 300; 200 works)"),
    ("--extra-ice", "extra_ice_nm", float, "NM", "ice slab thicker than the volume by NM, half above and half "
                                                 "below: more attenuation and amorphous background (default 0)"),
    ("--ice-crowding", "ice_crowding", float, "X", "protein-like density of that extra ice, times the cytosol's "
                                                   "(default 0.3)"),
    ("--damage", "damage_bfactor_per_dose", float, "A2_PER_E", "radiation damage: extra B-factor per e/A^2 of "
                                                                "accumulated dose, in A^2 (default 0 = off; ~20 is "
                                                                "realistic)"),
    ("--tilt-scheme", "tilt_scheme", ("dose-symmetric", "sequential"), None,
     "acquisition order for the accumulated dose (default dose-symmetric)"),
    ("--align-shift", "alignment_shift_nm", float, "NM", "tilt-series alignment error: sd of a random shift of "
                                                          "every tilt image, nm (default 0)"),
    ("--align-rotation", "alignment_rotation_deg", float, "DEG", "sd of a random in-plane rotation of every tilt "
                                                                 "image, degrees (default 0)"),
    ("--defocus-spread", "defocus_spread_um", float, "UM", "per-tilt defocus uniform in defocus +- UM/2 "
                                                           "(default 0)"),
    ("--ctf-correction", "ctf_correction", bool, None, "phase-flip every tilt image before the reconstruction "
                                                       "(default: no CTF correction)"),
    ("--read-noise", "read_noise_e", float, "E", "Gaussian detector read noise, electrons per pixel per tilt "
                                                 "(default 0)"),
    ("--noise-correlation", "noise_correlation_px", float, "PX", "correlated noise: blur the noise by a "
                                                                  "Gaussian MTF of PX pixels (default 0 = white)"),
    ("--membrane-model", "membrane_model", ("gaussian", "slab"), None,
     "head-group leaflet profile (default gaussian)"),
    ("--leaflet-width", "leaflet_width", float, "FRAC", "leaflet sigma / bilayer thickness (default 0.11)"),
    ("--headgroup-separation", "headgroup_separation", float, "FRAC",
     "distance of the head-group peaks / bilayer thickness (default 0.6)"),
    ("--bilayer-asymmetry", "bilayer_asymmetry", float, "A", "outer leaflet 1+A, inner 1-A times the head-group "
                                                              "density (default 0)"),
    ("--membrane-blur", "membrane_blur_nm", float, "NM", "extra Gaussian blur of the bilayer profile "
                                                         "(default 0)"),
    ("--lumen-texture", "lumen_texture", float, "FRAC", "volume fraction of granules in the vesicle lumen "
                                                        "(default 0)"),
    ("--vesicle-border-cut", "vesicle_border_cut", float, "FRAC", "how far vesicles may reach out of the Y and X "
                                                                  "faces, a fraction of the diameter (default 0)"),
    ("--reconstruction", "reconstruction", ("wbp", "sirt"), None,
     "weighted back-projection or SIRT (default wbp)"),
    ("--recon-filter", "recon_filter", ("ramp", "hamming", "shepp-logan"), None,
     "WBP filter window (default ramp)"),
    ("--sirt-iterations", "sirt_iterations", int, "N", "SIRT iterations (default 10)"),
    ("--recon-binning", "recon_binning", int, "N", "simulate N times finer, then bin N x (default 1; "
                                                    "costs N^3)"),
)


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
    _add_options(p, MAIN_OPTIONS)
    _add_options(p.add_argument_group(
        "physics options", "all off by default; see docs/simulator.md and cryoves.simulate.SimulationParams"),
        PHYSICS_OPTIONS)
    p.add_argument("--params", default=None, metavar="JSON",
                   help="a params.json (from a previous run) to start from; options given "
                        "on the command line override it")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUTDIR, replacing the files")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _add_options(parser, options) -> None:
    """One argument per row of an option table; its value lands in ``args.<field>`` (None: not given)."""
    for flag, name, kind, metavar, text in options:
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        elif isinstance(kind, tuple):
            parser.add_argument(flag, dest=name, choices=kind, default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=metavar, help=text)


def vesicles_csv_text(table) -> str:
    """The vesicle table as CSV text: :func:`cryoves.io.vesicles_csv_text` (kept for callers)."""
    from cryoves.io import vesicles_csv_text as _text

    return _text(table)


def simulation_record(sim, generator: str, **extra) -> dict:
    """The ``params.json`` of a simulated tomogram (``cryoves simulate``, the bundled sample data).

    Parameters
    ----------
    sim : cryoves.simulate.Simulation
    generator : str
        What wrote it.
    **extra
        More entries, placed after ``n_vesicles``.

    Returns
    -------
    dict
        ``generator``, ``shape``, ``voxel_size_nm``, ``n_vesicles``, the ``extra`` entries,
        ``tilt_angles_deg`` and ``params`` (every :class:`~cryoves.simulate.SimulationParams` field).
    """
    return {"generator": generator, "shape": [int(n) for n in sim.tomogram.shape], "voxel_size_nm": sim.voxel_size,
            "n_vesicles": len(sim.table), **extra, "tilt_angles_deg": [float(a) for a in sim.tilt_angles],
            "params": sim.params.to_dict()}


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
    base.update({name: getattr(args, name) for _, name, *_ in MAIN_OPTIONS + PHYSICS_OPTIONS
                 if getattr(args, name) is not None})
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
    meta = simulation_record(sim, f"cryoves {__version__} simulate", n_vesicles_requested=sim.n_requested,
                             seconds=round(elapsed, 2))
    cio.atomic_write_text(outdir / "params.json", json.dumps(meta, indent=2) + "\n", overwrite=ow)
    if not args.quiet:
        print(f"simulated {shape} at {v} nm with {len(sim.table)} vesicles in {elapsed:.1f} s -> {outdir}")
    return 0
