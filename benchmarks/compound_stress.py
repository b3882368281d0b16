"""Compound stress: several hard conditions at once, on tomograms that no suite holds.

The stress suite of ``cryoves evaluate`` turns one or two conditions at a time away from the
training data. Here each case combines several (low dose at 200 kV with a narrow tilt range,
alignment errors, thick ice and radiation damage; correlated noise with asymmetric, blurred
bilayers and textured lumens; small vesicles in a SIRT reconstruction; dense crowded vesicles
after CTF correction; a defocus spread with rotation errors), simulated by ``cryoves.simulate``
with seeds 80001-80005, which neither training nor the suites use. The cases were composed on
2026-12-01 and first run as a blind check: no parameter of cryoves was chosen on them. Later the
same day the default weights were replaced by a fine-tuned model after one comparison that
included these cases (docs/models.md): one candidate, adopted because no case of any set got
worse, but the cases are no longer quite blind. The large-vesicle pass's scale 0.6 (chosen on a
development set, docs/architecture.md) was checked once on them too: the same vesicles as 0.75.
Keep it that way, or say so here.

Each case runs through the whole pipeline (``cryoves.pipeline.segment``) with the default
weights and, when the reference CryoVesNet ``weights.h5`` is found beside the repository, with it
(its own preprocessing) and with it without its smoothing, and is scored as ``cryoves
evaluate`` scores (accepted vesicles, the paper's matching rule).

    python benchmarks/compound_stress.py [--report docs/accuracy.md] [--no-reference]

``--report`` rewrites the block between the ``compound_stress.py`` markers of that file
(``benchmarks/accuracy.py`` keeps it). About 5 minutes on 2 CPU cores with the reference weights.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from _report import emit, markers

BEGIN, END = markers("compound_stress.py")
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"
FIELD_NM = (150.0, 450.0, 450.0)
KV200 = dict(voltage_kv=200.0, mean_free_path_nm=280.0)

#: (name, voxel size nm, simulator settings); seed 80001 + index
CASES = [
    ("low dose 30 e/Å² at 200 kV, ±45°, 1 nm alignment shifts, +150 nm ice, damage", 2.6,
     dict(dose=30.0, tilt_range=45.0, alignment_shift_nm=1.0, extra_ice_nm=150.0, damage_bfactor_per_dose=20.0,
          **KV200)),
    ("correlated noise, asymmetric blurred bilayers, textured lumens, 60 e/Å²", 1.4,
     dict(noise_correlation_px=1.5, read_noise_e=2.0, bilayer_asymmetry=0.5, lumen_texture=0.3,
          membrane_blur_nm=1.2, dose=60.0)),
    ("small vesicles (radius 16 ± 4 nm, 12-26), SIRT, 60 e/Å²", 2.0,
     dict(radius_mean_nm=16.0, radius_sd_nm=4.0, radius_min_nm=12.0, radius_max_nm=26.0, reconstruction="sirt",
          dose=60.0)),
    ("dense vesicles in twice as crowded cytosol, CTF-corrected at −4 µm", 1.8,
     dict(defocus_um=-4.0, ctf_correction=True, vesicle_fraction=0.14, crowding=2.0)),
    ("defocus spread 1.5 µm, 0.5° rotation errors, 40 e/Å², ±40° in 3° steps", 2.2,
     dict(defocus_spread_um=1.5, alignment_rotation_deg=0.5, dose=40.0, tilt_range=40.0, tilt_step=3.0)),
]


def run(reference: Path | None):
    from cryoves.evaluate import match_vesicles
    from cryoves.model import get_model
    from cryoves.pipeline import SegmentParams, segment
    from cryoves.simulate import SimulationParams, simulate_tomogram

    runs = [("default", None, SegmentParams())]
    if reference is not None:
        runs += [("weights.h5", reference, SegmentParams()),
                 ("weights.h5 without its smoothing", reference, SegmentParams(preprocessing={"smooth_sigma": 0}))]
    models = {}
    rows = []
    for k, (name, vs, settings) in enumerate(CASES):
        shape = tuple(int(round(n / vs / 4) * 4) for n in FIELD_NM)
        sim = simulate_tomogram(shape, params=SimulationParams(voxel_size=vs, seed=80001 + k, **settings))
        row = {"name": name, "voxel_size": vs, "shape": shape, "n": len(sim.table)}
        for label, weights, params in runs:
            if label not in models:
                models[label] = get_model(None if weights is None else str(weights))
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = segment(sim.tomogram, vs, models[label], params=params, keep_intermediates=False)
            m = match_vesicles(res.table, sim.table)
            # missed vesicles no bigger than the size the outlier stage removes (the paper's 12 nm):
            # not looked for, by design; a user with such vesicles lowers min_radius_nm
            found = set(m.pairs[:, 1].tolist()) if len(m.pairs) else set()
            small = sim.table.radii * vs <= params.min_radius_nm + 1e-6
            fn_small = sum(1 for j in range(len(sim.table)) if small[j] and j not in found)
            row[label] = dict(tp=m.tp, fp=m.fp, fn=m.fn, f1=m.f1, delta_d=m.delta_d, seconds=time.perf_counter() - t0,
                              fn_small=fn_small, n_small=int(small.sum()))
            print(f"{name[:60]:60s} {label:34s} TP {m.tp:3d} FP {m.fp:2d} FN {m.fn:2d} F1 {m.f1:.3f}", flush=True)
        rows.append(row)
    return rows, [r[0] for r in runs]


def markdown(rows, labels, elapsed: float, argv: str, min_radius: float = 12.0) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [BEGIN, "", "## Compound stress (`benchmarks/compound_stress.py`)", "",
             f"Measured {when} with `python benchmarks/compound_stress.py {argv}` ({elapsed:.0f} s, "
             f"{platform.machine()}, Python {platform.python_version()}). Five tomograms of about "
             "150×450×450 nm, each combining several hard conditions, simulated with seeds that neither "
             "training nor the suites use (80001-80005); composed on 2026-12-01 and first run as a "
             "blind check: no parameter of cryoves was chosen on them; the default weights fine-tuned "
             "later that day were compared once with the weights before on these cases too, and "
             "adopted because no case of any set got worse (docs/models.md); the large-vesicle pass's "
             "scale 0.6, chosen on a development set, was checked once on them (the same vesicles as "
             "with 0.75). Whole pipeline, accepted vesicles, the paper's matching rule.", ""]
    head = "| case | voxel (nm) | vesicles | " + " | ".join(f"{lab}: F1 (TP / FP / FN)" for lab in labels) + " |"
    lines += [head, "|" + "---|" * (3 + len(labels))]
    for r in rows:
        cells = [f"{r[lab]['f1']:.3f} ({r[lab]['tp']} / {r[lab]['fp']} / {r[lab]['fn']})" for lab in labels]
        ns = r[labels[0]]["n_small"]
        n = f"{r['n']} ({ns} ≤ {min_radius:g} nm)" if ns else f"{r['n']}"
        lines.append(f"| {r['name']} | {r['voxel_size']:g} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for lab in labels:
        f1 = [r[lab]["f1"] for r in rows]
        small = [f"{r[lab]['fn_small']} of the {r[lab]['fn']} in the {r['name'].split(' (')[0].split(',')[0]} case"
                 for r in rows if r[lab]["fn_small"]]
        lines.append(f"- {lab}: mean F1 {sum(f1) / len(f1):.3f}, lowest {min(f1):.3f}; "
                     f"δd {sum(r[lab]['delta_d'] for r in rows) / len(rows):.3f} (mean over cases)."
                     + (f" Missed vesicles with a true outer radius of at most {min_radius:g} nm, the size the "
                        f"outlier stage removes by the paper's rule: {'; '.join(small)}." if small else ""))
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default=None, help="rewrite the compound_stress.py block of this Markdown file")
    ap.add_argument("--no-reference", action="store_true", help="the default weights only")
    a = ap.parse_args(argv)
    reference = None if a.no_reference or not REFERENCE.exists() else REFERENCE
    t0 = time.perf_counter()
    rows, labels = run(reference)
    from cryoves.pipeline import SegmentParams

    block = markdown(rows, labels, time.perf_counter() - t0, " ".join(sys.argv[1:] if argv is None else argv),
                     min_radius=SegmentParams().min_radius_nm)
    emit(block, a.report, "compound_stress.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
