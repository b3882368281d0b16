"""What input smoothing does for the default weights and for the reference ``weights.h5``.

Simulates the held-out suite (``cryoves.evaluate.evaluation_suite("default")``) and a few
harder variants of the simulator (low dose, 200 kV, strong B-factor, low DQE, narrow tilt
range), predicts each with several preprocessings (``predict_probability(...,
preprocessing=...)``), runs the rest of the pipeline (``cryoves.pipeline.segment`` with that
probability map) and scores it (``cryoves.evaluate.evaluate_segmentation``). Prints one row
per (case, weights, preprocessing) and a mean per configuration; ``--json`` writes them.

    python benchmarks/preprocessing.py [--suites default,hard] [--json out.json]

About 10 minutes on 2 shared CPU cores for both suites and the 5 configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REFERENCE = Path(os.environ.get(
    "CRYOVES_REFERENCE_WEIGHTS",
    Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cryovesnet-weights"
    / "weights.h5"))

#: Harder variants of the cryoves simulator (seeds 60001+, never used in training): they stand
#: in for the independent low-dose / 200 kV / blurred data that the standard suite cannot show.
HARD_CASES = [
    # name, shape_nm, voxel size (nm), seed, SimulationParams overrides
    ("hard-dose15-200kV-2.2nm", (150, 300, 300), 2.2, 60011,
     {"dose": 15.0, "voltage_kv": 200.0, "dqe": 0.25, "bfactor": 6000.0, "defocus_um": -10.0,
      "mean_free_path_nm": 250.0}),
    ("hard-gauss-noise-1.6nm", (150, 300, 300), 1.6, 60012,
     {"snr": 0.05, "bfactor": 5000.0}),
    ("hard-tilt40-crowded-2.2nm", (150, 300, 300), 2.2, 60013,
     {"tilt_range": 40.0, "dose": 25.0, "dqe": 0.3, "bfactor": 5000.0, "crowding": 2.0,
      "radial_cutoff": 0.25}),
    ("hard-membranes-1.8nm", (150, 300, 300), 1.8, 60014,
     {"dose": 30.0, "voltage_kv": 200.0, "dqe": 0.3, "bfactor": 5000.0,
      "membrane_thickness_nm": 5.5, "radius_mean_nm": 24.0, "radius_sd_nm": 5.0,
      "radius_min_nm": 14.0, "radius_max_nm": 34.0}),
]


def _cases(suites):
    from cryoves.evaluate import SuiteCase, evaluation_suite

    out = []
    if "default" in suites:
        out += [("default", c) for c in evaluation_suite("default")]
    if "hard" in suites:
        out += [("hard", SuiteCase(n, s, v, seed, p)) for n, s, v, seed, p in HARD_CASES]
    return out


def _configs(weights):
    from cryoves.model import get_model

    configs = []
    if "default" in weights:
        m = get_model(None)
        for sigma in (0.0, 0.5, 1.0):
            configs.append((f"default sigma={sigma:g}", m, {"smooth_sigma": sigma}))
    if "reference" in weights and REFERENCE.is_file():
        m = get_model(REFERENCE)
        configs.append(("weights.h5 own (sigma=1, z-score)", m, None))
        configs.append(("weights.h5 sigma=0", m, {"smooth_sigma": 0.0}))
    return configs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="default,hard")
    ap.add_argument("--weights", default="default,reference")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from cryoves.evaluate import evaluate_segmentation, simulate_case
    from cryoves.pipeline import segment
    from cryoves.predict import predict_probability

    cases = _cases(a.suites.split(","))
    if a.cases:
        keep = set(a.cases.split(","))
        cases = [c for c in cases if c[1].name in keep]
    configs = _configs(a.weights.split(","))
    rows = []
    t_all = time.perf_counter()
    for suite, case in cases:
        t0 = time.perf_counter()
        sim = simulate_case(case)
        t_sim = time.perf_counter() - t0
        for label, model, prep in configs:
            t0 = time.perf_counter()
            prob = predict_probability(sim.tomogram, sim.voxel_size, model, preprocessing=prep)
            res = segment(sim.tomogram, sim.voxel_size, probability=prob)
            m = evaluate_segmentation(res, sim.table, sim.labels)
            row = {"suite": suite, "case": case.name, "config": label,
                   "f1": m["f1"], "dice_final": m["dice_outliers"],
                   "dice_probability": m["dice_probability"], "tp": m["tp"], "fp": m["fp"],
                   "fn": m["fn"], "n_truth": m["n_truth"], "delta_d": m["delta_d"],
                   "seconds": time.perf_counter() - t0, "simulate_seconds": t_sim}
            rows.append(row)
            print(f"{suite:8s} {case.name:28s} {label:34s} F1 {row['f1']:.3f} Dice "
                  f"{row['dice_final']:.3f} prob {row['dice_probability']:.3f} "
                  f"TP {row['tp']} FP {row['fp']} FN {row['fn']} ({row['seconds']:.0f} s)",
                  flush=True)
    print("\nmean per suite and configuration:")
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for label in dict.fromkeys(r["config"] for r in rows):
            sel = [r for r in rows if r["suite"] == suite and r["config"] == label]
            if sel:
                print(f"{suite:8s} {label:34s} F1 {np.mean([r['f1'] for r in sel]):.3f} "
                      f"Dice {np.mean([r['dice_final'] for r in sel]):.3f} "
                      f"min F1 {min(r['f1'] for r in sel):.3f}")
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f} s on {platform.machine()}, cores visible: "
          f"{len(__import__('os').sched_getaffinity(0))}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "seconds": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
