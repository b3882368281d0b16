"""Radius rule across membrane profiles: δd of the sphere refinement when the leaflet width, the
head-group separation, the bilayer blur, the defocus, the voxel size and the reconstruction vary.

Every profile is one small tomogram simulated by ``cryoves.simulate`` (the same physical field of
view, about 130 x 350 x 350 nm, whatever the voxel size), every other setting at its default. The
refinement (``cryoves.refine.refine_spheres``, the pipeline's defaults) starts from the true
spheres moved by 1.5 voxels in a random direction with radii 0.85-1.15 times too small or large
(like the starts the threshold stages give), so the numbers measure the radius rule and the
centring, not the network. δd is the paper's: the mean over the fitted vesicles of
``1 - min(d_fit, d_true) / max(d_fit, d_true)``; "bias" is the mean signed relative radius
error. The default rule (``membrane_centre``) is compared with ``max_slope``.

    python benchmarks/radius_rule.py [--report docs/accuracy.md] [--quick]

``--report`` rewrites the block between the ``radius_rule.py`` markers of that file (appending
it when absent). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

from _report import emit, markers
from cryoves.refine import refine_spheres
from cryoves.simulate import SimulationParams, simulate_tomogram
from cryoves.table import VesicleTable

BEGIN, END = markers("radius_rule.py")
FIELD_NM = (130.0, 350.0, 350.0)
TARGET = 0.02

#: (name, voxel size nm, SimulationParams overrides): one parameter at a time over its realistic
#: range, then combinations
PROFILES = [
    ("default", 2.2, {}),
    ("leaflet width 0.06", 2.2, dict(leaflet_width=0.06)),
    ("leaflet width 0.18", 2.2, dict(leaflet_width=0.18)),
    ("head-group separation 0.45", 2.2, dict(headgroup_separation=0.45)),
    ("head-group separation 0.75", 2.2, dict(headgroup_separation=0.75)),
    ("bilayer blur 0.8 nm", 2.2, dict(membrane_blur_nm=0.8)),
    ("bilayer blur 1.5 nm", 2.2, dict(membrane_blur_nm=1.5)),
    ("defocus -3 µm", 2.2, dict(defocus_um=-3.0)),
    ("defocus -12 µm", 2.2, dict(defocus_um=-12.0)),
    ("defocus -5 µm, CTF-corrected", 2.2, dict(defocus_um=-5.0, ctf_correction=True)),
    ("flat-topped leaflets (slab)", 2.2, dict(membrane_model="slab")),
    ("1.2 nm voxels", 1.2, {}),
    ("1.2 nm, CTF-corrected, -4 µm", 1.2, dict(defocus_um=-4.0, ctf_correction=True)),
    ("2.8 nm voxels", 2.8, {}),
    ("2.8 nm, blur 1.5 nm, -12 µm", 2.8, dict(membrane_blur_nm=1.5, defocus_um=-12.0)),
    ("2.2 nm, leaflet 0.18, separation 0.45, blur 1.5 nm", 2.2,
     dict(leaflet_width=0.18, headgroup_separation=0.45, membrane_blur_nm=1.5)),
    ("2.2 nm, leaflet 0.09, separation 0.75, -3 µm", 2.2,
     dict(leaflet_width=0.09, headgroup_separation=0.75, defocus_um=-3.0)),
    ("1.6 nm, leaflet 0.09, separation 0.75", 1.6, dict(leaflet_width=0.09, headgroup_separation=0.75)),
    ("2.2 nm, leaflet 0.06, separation 0.75, -3 µm", 2.2,
     dict(leaflet_width=0.06, headgroup_separation=0.75, defocus_um=-3.0)),
    ("1.6 nm, leaflet 0.06, separation 0.75", 1.6, dict(leaflet_width=0.06, headgroup_separation=0.75)),
    ("SIRT reconstruction", 2.2, dict(reconstruction="sirt")),
    ("reconstructed at 1.1 nm, binned 2x", 2.2, dict(recon_binning=2, recon_filter="shepp-logan")),
]
#: the sharpest leaflets (Gaussian sigma 0.27 nm) at the widest separation (3.4 nm): two dark
#: lines that the tomogram resolves; reported apart (see the report)
EXTREME = {"2.2 nm, leaflet 0.06, separation 0.75, -3 µm", "1.6 nm, leaflet 0.06, separation 0.75"}
QUICK = {"default", "bilayer blur 1.5 nm", "1.2 nm, CTF-corrected, -4 µm", "2.8 nm voxels"}


def perturbed_start(truth: VesicleTable, voxel_size: float, seed: int) -> VesicleTable:
    """The true spheres moved by 1.5 voxels in a random direction, radii x U(0.85, 1.15)."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((len(truth), 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return VesicleTable.from_arrays(truth.centers + 1.5 * d, truth.radii * rng.uniform(0.85, 1.15, len(truth)),
                                    voxel_size=voxel_size)


def measure(name: str, voxel_size: float, overrides: dict, seed: int = 1) -> dict:
    """Simulate one profile and refine with both rules; returns the row of the table."""
    shape = tuple(int(round(n / voxel_size)) for n in FIELD_NM)
    params = SimulationParams(voxel_size=voxel_size, seed=seed, **overrides)
    t0 = time.perf_counter()
    sim = simulate_tomogram(shape, params=params)
    truth = sim.table
    start = perturbed_start(truth, voxel_size, seed + 100)
    row = {"name": name, "voxel_size": voxel_size, "shape": shape, "n": len(truth),
           "overrides": overrides}
    for method in ("membrane_centre", "max_slope"):
        out = refine_spheres(sim.tomogram, start, voxel_size, radius_method=method)
        ok = out["status"] == "accepted"
        rt, rf = truth.radii[ok], out.radii[ok]
        dd = 1.0 - np.minimum(rf, rt) / np.maximum(rf, rt)
        row[method] = {"fitted": int(ok.sum()), "delta_d": float(dd.mean()), "bias": float(np.mean(rf / rt - 1)),
                       "max": float(dd.max()),
                       "dc_nm": float(np.mean(np.linalg.norm(out.centers[ok] - truth.centers[ok], axis=1)) * voxel_size)}
    row["seconds"] = time.perf_counter() - t0
    return row


def markdown(rows, elapsed: float, argv: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    main = [r for r in rows if r["name"] not in EXTREME] or rows
    ok = [r for r in main if r["membrane_centre"]["delta_d"] <= TARGET]
    worst = max(main, key=lambda r: r["membrane_centre"]["delta_d"])
    extreme = [r for r in rows if r["name"] in EXTREME]
    lines = [
        BEGIN, "",
        "## Radius rule across membrane profiles (`benchmarks/radius_rule.py`)", "",
        f"Measured {when} with `python benchmarks/radius_rule.py {argv}` ({elapsed:.0f} s, "
        f"{platform.machine()}, Python {platform.python_version()}). One small tomogram per membrane "
        "profile, simulated by `cryoves simulate` (the same field of view, about 130×350×350 nm, at "
        "every voxel size; all other settings at their defaults: 300 kV, −8 µm, ±60°, 100 e/Å², "
        "bilayer 4.5 ± 0.25 nm), refined by `refine_spheres` with the pipeline's defaults from the "
        "true spheres moved 1.5 voxels in a random direction with radii 0.85–1.15× (the network is "
        "not involved: this isolates the radius rule and the centring). δd as in the paper, bias = "
        "mean signed relative radius error, Δc = mean centre error.", "",
        f"**Default rule (`membrane_centre`): δd ≤ {TARGET} on {len(ok)} of {len(main)} profiles; "
        f"largest {worst['membrane_centre']['delta_d']:.4f} ({worst['name']}).**"
        + ("" if not extreme else
           " Not counted there, the last rows: the sharpest leaflets (Gaussian σ 0.06 of the bilayer, "
           "0.27 nm) at the widest separation (0.75 of it, 3.4 nm apart), where the tomogram shows "
           "the bilayer as two dark lines 4.5–6 nm apart with a light line between them, give δd "
           + ", ".join(f"{r['membrane_centre']['delta_d']:.4f} ({r['name']})" for r in extreme)
           + ". The radius rule takes the centre of both lines (the centroid of the membrane's "
           "dark mass, docs/architecture.md); what remains is centring: from the true spheres "
           "themselves, the capture step's thin-shell search moves some centres by about a voxel "
           "(riding the inner line on one side and the outer on the other), and the radius "
           "follows."), "",
        "| profile | voxel (nm) | vesicles | fitted | δd | bias | worst vesicle | Δc (nm) | "
        "δd `max_slope` | bias `max_slope` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in main + extreme:
        a, b = r["membrane_centre"], r["max_slope"]
        lines.append(f"| {r['name']} | {r['voxel_size']:g} | {r['n']} | {a['fitted']} | {a['delta_d']:.4f} | "
                     f"{a['bias']:+.4f} | {a['max']:.3f} | {a['dc_nm']:.2f} | {b['delta_d']:.4f} | {b['bias']:+.4f} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default=None, help="rewrite the radius_rule.py block of this Markdown file")
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} profiles")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name, vs, ov in PROFILES:
        if a.quick and name not in QUICK:
            continue
        r = measure(name, vs, ov)
        rows.append(r)
        m, s = r["membrane_centre"], r["max_slope"]
        print(f"{name:52s} {vs:4.1f} nm  n {r['n']:3d}  δd {m['delta_d']:.4f} bias {m['bias']:+.4f} "
              f"Δc {m['dc_nm']:.2f} nm | max_slope δd {s['delta_d']:.4f} bias {s['bias']:+.4f}  ({r['seconds']:.0f} s)",
              flush=True)
    block = markdown(rows, time.perf_counter() - t0, " ".join(sys.argv[1:] if argv is None else argv))
    emit(block, a.report, "radius_rule.py")
    worst = max(r["membrane_centre"]["delta_d"] for r in rows if r["name"] not in EXTREME)
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
