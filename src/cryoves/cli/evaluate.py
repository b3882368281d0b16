"""``cryoves evaluate``: the paper's evaluation (per-stage Dice, F1, δd, Δc) on a held-out
simulated suite, or on your own tomogram with a ground-truth table, for one or more weights
side by side."""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import subprocess
import sys
import time
from pathlib import Path

from cryoves.cli import CliError

_METRICS = [("dice_probability", "Dice prob."), ("dice_global", "Dice global"), ("dice_adaptive", "Dice adaptive"),
            ("dice_refine", "Dice refine"), ("dice_outliers", "Dice final"), ("n_truth", "GT"), ("tp", "TP"),
            ("fp", "FP"), ("fn", "FN"), ("f1", "F1"), ("delta_d", "δd"), ("delta_c_nm", "Δc (nm)"),
            ("seconds", "time (s)")]


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="measure accuracy (Dice per stage, F1, δd, Δc) against ground truth",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", action="append", default=[], metavar="PATH|default",
                   help="weights to evaluate (repeat to compare side by side); 'default' = shipped weights")
    p.add_argument("--suite", default="default", choices=["default", "quick"],
                   help="held-out simulated suite (ignored with --tomogram)")
    p.add_argument("--tomogram", help="evaluate on this tomogram instead of the simulated suite")
    p.add_argument("--truth", help="ground-truth vesicle table CSV for --tomogram")
    p.add_argument("--voxel-size", type=float, default=None, help="override the header voxel size (nm)")
    p.add_argument("--report", default=None, help="write the tables as Markdown to this file")
    p.add_argument("--tta", action="store_true", help="test-time augmentation in prediction")
    return p


def format_table(rows: list[dict], title_key: str = "case") -> str:
    header = "| weights | " + title_key + " | " + " | ".join(h for _, h in _METRICS) + " |"
    sep = "|" + "---|" * (len(_METRICS) + 2)
    lines = [header, sep]
    for r in rows:
        cells = []
        for k, _ in _METRICS:
            v = r.get(k, float("nan"))
            cells.append(f"{v:d}" if isinstance(v, int) else f"{v:.3f}" if k != "seconds" else f"{v:.0f}")
        lines.append(f"| {r['weights']} | {r[title_key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def run(args) -> int:
    import numpy as np

    from cryoves import render_labels
    from cryoves.evaluate import evaluate_segmentation, evaluation_suite, simulate_case, summarize
    from cryoves.model import load_model
    from cryoves.pipeline import SegmentParams, segment

    weights = args.weights or ["default"]
    models = {}
    for w in weights:
        try:
            models[w] = load_model(None if w == "default" else w)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CliError(f"cannot load weights {w!r}: {err}") from err

    if args.tomogram:
        from cryoves.io import read_tomogram, read_vesicles_csv

        if not args.truth:
            raise CliError("--tomogram needs --truth VESICLES.csv")
        tomo, vs = read_tomogram(args.tomogram, voxel_size=args.voxel_size)
        truth = read_vesicles_csv(args.truth)
        truth.voxel_size = vs
        cases = [(Path(args.tomogram).name, np.asarray(tomo, np.float32), vs, truth,
                  render_labels(truth, tomo.shape))]
    else:
        cases = []
        for case in evaluation_suite(args.suite):
            print(f"simulating {case.name} {case.shape} ...", file=sys.stderr)
            sim = simulate_case(case)
            cases.append((case.name, sim.tomogram, sim.voxel_size, sim.table, sim.labels))

    rows = []
    for wname, model in models.items():
        label = "default" if wname == "default" else Path(wname).name
        for name, tomo, vs, truth, truth_labels in cases:
            t0 = time.perf_counter()
            result = segment(tomo, vs, model=model, params=SegmentParams(tta=args.tta))
            row = {"weights": f"{label} ({model.card.voxel_size_nm:g} nm)", "case": name,
                   **evaluate_segmentation(result, truth, truth_labels),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{label:>24} {name:>22}: F1 {row['f1']:.3f}  Dice final {row['dice_outliers']:.3f}  "
                  f"δd {row['delta_d']:.3f}  Δc {row['delta_c_nm']:.2f} nm", file=sys.stderr)
        mean = summarize([r for r in rows if r["weights"].startswith(label)])
        rows.append({"weights": rows[-1]["weights"], "case": "**mean**", **mean})
    table = format_table(rows)
    print(table)
    if args.report:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores"
        text = (f"Measured {stamp}, commit {_git_commit()}, {machine}; suite `{args.suite}`"
                f"{', TTA' if args.tta else ''}.\n\n{table}\n")
        out = Path(args.report)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"report written to {out}", file=sys.stderr)
    return 0
