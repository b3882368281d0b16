"""``cryoves evaluate``: the paper's evaluation (per-stage Dice, F1, δd, Δc) and what every stage
did to the true vesicles, on a held-out simulated suite or on your own tomogram with a
ground-truth table, for one or more weights side by side."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
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

#: stage names as shown in the tables
_STAGE_TITLES = {"probability": "prob. > 0.5", "global": "global", "adaptive": "adaptive", "refine": "refine",
                 "outliers": "outliers (final)"}

#: measured run time of one weights file per suite (simulation included) on 2 CPU cores that
#: were shared with other jobs (load average about 13); an idle machine needs less
RUN_TIME = {
    "quick": "about 1 min",
    "default": "about 5 min",
    "stress": "about 13 min",
}

_DESCRIPTION = """\
Measure accuracy against ground truth as the CryoVesNet paper does: voxel Dice after each
stage (probability map at 0.5, global threshold, adaptive threshold, sphere refinement,
outlier removal = final), per-vesicle TP/FP/FN, F1, relative diameter error (δd) and
centre distance (Δc, nm). A second table says, per stage, how many true vesicles were
found after it, how many it lost (found before, not after) and how many false ones it let
through.

Suites (simulated, never used for training; two outlier-stage thresholds were chosen on them):
{suites}

Run time per weights file, simulation included, measured on 2 busy shared CPU cores
(less on an idle machine): quick {quick}, default {default}, stress {stress}."""


def _description() -> str:
    import textwrap

    from cryoves.evaluate import SUITES

    lines = []
    for name, text in SUITES.items():
        lines += textwrap.wrap(text, width=88, initial_indent=f"  {name:<8} ", subsequent_indent=" " * 11)
    return _DESCRIPTION.format(suites="\n".join(lines), **RUN_TIME)


_EPILOG = """\
Examples:
  cryoves evaluate --suite stress --weights default --weights weights.h5 --report stress.md
  cryoves evaluate --suite default --case dense-1.8nm
  cryoves evaluate --tomogram tomo.mrc --truth vesicles.csv --weights my.weights.h5"""


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="measure accuracy (Dice per stage, F1, δd, Δc, true vesicles lost per stage)",
        description=_description(), epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", action="append", default=None, metavar="PATH|default",
                   help="weights to evaluate; repeat to compare side by side ('default' = the weights shipped "
                        "with cryoves; default: only those)")
    p.add_argument("--suite", default="default", choices=["default", "stress", "quick"],
                   help="held-out simulated suite (default: default; ignored with --tomogram)")
    p.add_argument("--seed-offset", type=int, default=0, metavar="N",
                   help="a development copy of the suite: the same cases simulated with every seed + N, for "
                        "choosing parameters without touching the held-out suite (default: 0, the suite itself)")
    p.add_argument("--case", action="append", default=None, metavar="NAME",
                   help="evaluate only this case of the suite; repeat for several (default: every case)")
    p.add_argument("--tomogram", metavar="TOMO.mrc",
                   help="evaluate on this tomogram instead of a suite (default: none, the suite is used)")
    p.add_argument("--truth", metavar="VESICLES.csv",
                   help="ground-truth vesicle table for --tomogram (required with it; default: none)")
    p.add_argument("--voxel-size", type=float, default=None, metavar="NM",
                   help="voxel size of --tomogram in nm (default: from the MRC header)")
    p.add_argument("--report", default=None, metavar="FILE.md",
                   help="also write the tables as Markdown to this file (default: print only)")
    p.add_argument("--json", default=None, metavar="FILE.json",
                   help="also write every row (all metrics, per stage) as JSON to this file (default: none)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation in prediction (default: off)")
    p.add_argument("--compare-unsmoothed", action="store_true",
                   help="also evaluate every weights file given by path (not 'default') whose model card "
                        "smooths its input without that smoothing (smooth_sigma 0), side by side "
                        "(default: off)")
    return p


def _cell(key: str, v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:d}"
    if key == "seconds":
        return f"{v:.0f}"
    return f"{v:.3f}"


def format_table(rows: list[dict], title_key: str = "case") -> str:
    """The metric table, one row per (weights, case), Markdown."""
    header = "| weights | " + title_key + " | " + " | ".join(h for _, h in _METRICS) + " |"
    sep = "|" + "---|" * (len(_METRICS) + 2)
    lines = [header, sep]
    for r in rows:
        cells = [_cell(k, r.get(k, float("nan"))) for k, _ in _METRICS]
        lines.append(f"| {r['weights']} | {r[title_key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stages(rows: list[dict]) -> list[str]:
    names = []
    for r in rows:
        for k in r:
            if k.startswith("found_") and k[6:] not in names:
                names.append(k[6:])
    return names


def format_stage_table(rows: list[dict], title_key: str = "case") -> str:
    """Per stage: true vesicles found after it, lost by it (−) and false ones let through (+)."""
    stages = _stages(rows)
    header = ("| weights | " + title_key + " | GT | "
              + " | ".join(_STAGE_TITLES.get(s, s) for s in stages) + " |")
    sep = "|" + "---|" * (len(stages) + 3)
    lines = [header, sep]
    for r in rows:
        cells = []
        for s in stages:
            if f"found_{s}" in r:
                cells.append(f"{r[f'found_{s}']} (−{r[f'lost_{s}']}, +{r[f'fp_{s}']})")
            else:
                cells.append("")
        lines.append(f"| {r['weights']} | {r[title_key]} | {r.get('n_truth', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _load_cases(args):
    """Yield (name, tomogram, voxel size, truth table, truth labels, seconds to make) lazily."""
    import numpy as np

    from cryoves import render_labels

    if args.tomogram:
        from cryoves.io import read_tomogram, read_vesicles_csv

        if not args.truth:
            raise CliError("--tomogram needs --truth VESICLES.csv")
        try:
            tomo, vs = read_tomogram(args.tomogram, voxel_size=args.voxel_size)
            truth = read_vesicles_csv(args.truth)
        except (OSError, ValueError) as err:
            raise CliError(str(err)) from err
        truth.voxel_size = vs
        yield (Path(args.tomogram).name, np.asarray(tomo, np.float32), vs, truth,
               render_labels(truth, tomo.shape), 0.0)
        return
    from cryoves.evaluate import simulate_case

    for case in _suite_cases(args):
        print(f"simulating {case.name} {case.shape} at {case.voxel_size:g} nm ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        sim = simulate_case(case)
        yield case.name, sim.tomogram, sim.voxel_size, sim.table, sim.labels, time.perf_counter() - t0


def _suite_cases(args):
    from cryoves.evaluate import evaluation_suite

    cases = evaluation_suite(args.suite, seed_offset=args.seed_offset)
    if args.case:
        known = [c.name for c in cases]
        missing = [n for n in args.case if n not in known]
        if missing:
            raise CliError(f"--case {', '.join(missing)}: not in suite {args.suite!r}; its cases: {', '.join(known)}")
        cases = [c for c in cases if c.name in args.case]
    return cases


def run(args) -> int:
    from cryoves.evaluate import evaluate_segmentation, summarize
    from cryoves.model import load_model
    from cryoves.pipeline import SegmentParams, segment

    if args.tomogram is None and args.truth:
        raise CliError("--truth needs --tomogram")
    if args.tomogram is None:
        _suite_cases(args)   # check --case before loading anything
    weights = args.weights or ["default"]
    models = {}
    for w in weights:
        try:
            models[w] = load_model(None if w == "default" else w)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CliError(f"cannot load weights {w!r}: {err}") from err
    labels = {w: ("default" if w == "default" else Path(w).name) for w in weights}
    titles = {w: f"{labels[w]} ({m.card.voxel_size_nm:g} nm)" for w, m in models.items()}
    # (key, weights, preprocessing override): each weights as its card says, then unsmoothed where asked
    runs = [(w, w, None) for w in weights]
    if args.compare_unsmoothed:
        for w in weights:
            sigma = models[w].card.preprocessing["smooth_sigma"]
            if sigma > 0 and w != "default":
                key = f"{w} (unsmoothed)"
                runs.append((key, w, {"smooth_sigma": 0.0}))
                labels[key] = f"{labels[w]}, σ 0"
                titles[key] = f"{labels[w]} without its σ {sigma:g} smoothing ({models[w].card.voxel_size_nm:g} nm)"

    per_weights: dict[str, list[dict]] = {key: [] for key, _, _ in runs}
    sim_seconds = 0.0
    for name, tomo, vs, truth, truth_labels, made in _load_cases(args):
        sim_seconds += made
        for w, weights_key, prep in runs:
            model = models[weights_key]
            t0 = time.perf_counter()
            result = segment(tomo, vs, model=model, params=SegmentParams(tta=args.tta, preprocessing=prep))
            row = {"weights": titles[w], "case": name, **evaluate_segmentation(result, truth, truth_labels),
                   "seconds": time.perf_counter() - t0}
            per_weights[w].append(row)
            print(f"{labels[w]:>24} {name:>28}: F1 {row['f1']:.3f}  Dice final {row['dice_outliers']:.3f}  "
                  f"δd {row['delta_d']:.3f}  Δc {row['delta_c_nm']:.2f} nm  "
                  f"({row['fn']} of {row['n_truth']} missed, {row['fp']} FP)", file=sys.stderr, flush=True)
    rows = []
    for w in per_weights:
        rows += per_weights[w]
        if len(per_weights[w]) > 1:
            rows.append({"weights": titles[w], "case": "**mean / total**", **summarize(per_weights[w])})
    table = format_table(rows)
    stage_table = format_stage_table(rows)
    print(table)
    print()
    print(stage_table)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from cryoves.model import inference_precision

    machine = f"{platform.machine()}, {os.cpu_count()} cores, U-Net in {inference_precision()}"
    source = f"`{Path(args.tomogram).name}`" if args.tomogram else f"suite `{args.suite}`"
    header = (f"Measured {stamp}, commit {_git_commit()}, {machine}; {source}"
              f"{', TTA' if args.tta else ''}; simulation {sim_seconds:.0f} s.")
    if args.report:
        text = (f"{header}\n\n{table}\n\n"
                f"True vesicles per stage: found after the stage (−lost by it, +false ones let through).\n\n"
                f"{stage_table}\n")
        _write_atomic(Path(args.report), text, "--report")
        print(f"report written to {args.report}", file=sys.stderr)
    if args.json:
        import json

        import numpy as np

        def plain(v):
            return v.item() if isinstance(v, np.generic) else v

        payload = {"header": header, "suite": None if args.tomogram else args.suite, "tta": bool(args.tta),
                   "simulation_seconds": sim_seconds,
                   "rows": [{k: plain(v) for k, v in r.items()} for r in rows]}
        _write_atomic(Path(args.json), json.dumps(payload, indent=1, allow_nan=True) + "\n", "--json")
    return 0


def _write_atomic(out: Path, text: str, option: str) -> None:
    from cryoves.io import atomic_write_text

    try:
        atomic_write_text(out, text, overwrite=True)
    except OSError as err:
        raise CliError(f"cannot write {option} {out}: {err}") from err
