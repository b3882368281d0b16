"""How low can the post-processing share of ``cryoves segment`` go on these cores?

#11 asks for post-processing (global threshold to writing) of at most 25 % of the end-to-end
time. This script measures the share with the default stage parameters and with parts of the
method switched off through :class:`cryoves.pipeline.SegmentParams`, on the simulated tomogram
of ``benchmarks/speed.py``, so that the floor of the share is measured, not guessed:

- ``default``: the pipeline as shipped (the control);
- ``lean``: without the refinement's capture search (``capture=False``), without the outlier
  stage's re-fits (``outlier_max_iter=0``: an outlier is removed or kept as first fitted) and
  without the bisection of the split threshold (``split_fine_step`` = ``split_step``);
- ``lean, no adaptive``: ``lean`` without the adaptive threshold (``adaptive=False``): the
  merged segments of the global threshold are refined as they are;
- ``lean, no outlier stage``: ``lean`` without the outlier stage (``outliers=False``): every
  refined sphere is kept.

Each run is a fresh process that does what ``cryoves segment TOMO --out DIR`` does for one
tomogram (:func:`cryoves.batch.run_one`, with the U-Net built in a background thread once the
tomogram is read, then ``os._exit``), timed from process start to exit. The variants alternate
round by round, since this machine's speed drifts by 10-30 % within minutes. Each run is
matched with the simulation's ground truth (:func:`cryoves.evaluate.match_vesicles`): what a
variant saves is printed with what it costs on this one tomogram (our own simulator, so only
an indication; ``benchmarks/accuracy.py`` is the accuracy benchmark).

Usage::

    python benchmarks/speed.py                 # once, to simulate the tomogram
    python benchmarks/post_floor.py --rounds 3 # ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed import _env as speed_env  # this folder: the environment speed.py runs cryoves in

DEFAULT_TOMO = Path("/tmp/cryoves_speed/sim_160x384x384_s1/tomogram.mrc")
POST = ("global", "adaptive", "refine", "outliers", "write")
LEAN = {"capture": False, "outlier_max_iter": 0, "split_fine_step": None}  # None: = split_step
VARIANTS = {
    "default": {},
    "lean": LEAN,
    "lean, no adaptive": {**LEAN, "adaptive": False},
    "lean, no outlier stage": {**LEAN, "outliers": False},
}


def variant_params(variant: str):
    """The :class:`cryoves.pipeline.SegmentParams` of ``variant`` (a key of :data:`VARIANTS`)."""
    from cryoves.pipeline import SegmentParams

    params = SegmentParams()
    changes = dict(VARIANTS[variant])
    if "split_fine_step" in changes and changes["split_fine_step"] is None:
        changes["split_fine_step"] = params.split_step
    return params.replace(**changes)


def child(variant: str, tomo: str, out: str) -> None:
    """One run of ``variant`` in this (fresh) process; prints its run record's figures as JSON."""
    from cryoves.batch import RunOptions, run_one
    from cryoves.cli.segment import _ModelLoader

    loader = _ModelLoader(None)

    def get_params():  # as the CLI: the model is built in the background once the tomogram is read
        loader.start()
        return variant_params(variant)

    outcome = run_one(Path(tomo), None, Path(out), RunOptions(), get_params, loader.result)
    if outcome["status"] != "done":
        print(json.dumps({"error": outcome["error"]}))
    else:
        rec = outcome["record"]
        print(json.dumps({"timings_s": rec["timings_s"], "n_accepted": rec["n_accepted"]}))
    sys.stdout.flush()
    workers = sys.modules.get("cryoves._workers")
    if workers is not None:
        workers.shutdown()
    os._exit(0)


def run(variant: str, tomo: Path, truth) -> dict:
    """``variant`` in a fresh process: wall time, stages, share, and the match with the truth."""
    from cryoves.evaluate import match_vesicles
    from cryoves.io import read_vesicles_csv

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(tomo), str(out)],
                              capture_output=True, text=True, env=speed_env())
        wall = time.perf_counter() - t0
        lines = proc.stdout.strip().splitlines()
        res = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
        if proc.returncode != 0 or "error" in res:
            raise RuntimeError(f"{variant}: {res.get('error', proc.stderr[-2000:])}")
        m = match_vesicles(read_vesicles_csv(out / f"{tomo.stem}_vesicles.csv"), truth)
    t = res["timings_s"]
    post = sum(t[k] for k in POST)
    return {"wall": wall, "predict": t["predict"], "post": post, "share": post / wall,
            "stages": {k: t[k] for k in POST}, "found": res["n_accepted"], "f1": m.f1, "fp": m.fp,
            "fn": m.fn, "centre_nm": m.delta_c_nm, "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tomogram", type=Path, default=DEFAULT_TOMO,
                    help="a simulated tomogram with its vesicles.csv beside it (default: speed.py's 160x384x384)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternated (default 3)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "TOMO", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
    from cryoves.io import read_vesicles_csv

    truth_csv = args.tomogram.parent / "vesicles.csv"
    if not args.tomogram.is_file() or not truth_csv.is_file():
        print(f"no simulated tomogram with its truth at {args.tomogram} (run benchmarks/speed.py once)",
              file=sys.stderr)
        return 2
    truth = read_vesicles_csv(truth_csv)
    results = {v: [] for v in VARIANTS}
    for i in range(args.rounds):
        for v in VARIANTS:
            r = run(v, args.tomogram, truth)
            results[v].append(r)
            st = " ".join(f"{k} {x:.2f}" for k, x in r["stages"].items())
            print(f"round {i + 1} {v:18s} end to end {r['wall']:5.1f} s  predict {r['predict']:4.1f} s  "
                  f"post {r['post']:4.1f} s ({100 * r['share']:.0f} %)  [{st}]  found {r['found']}  "
                  f"F1 {r['f1']:.3f}  load {r['load']:.1f}", flush=True)
    print("\n| variant | end to end | predict | post-processing | share | vesicles found | F1 | FP | FN | centre error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "predict", "post", "share")}
        shares = ", ".join(f"{100 * r['share']:.0f}" for r in rs)
        r0 = rs[0]  # the result itself does not change from run to run
        print(f"| {v} | {med['wall']:.1f} s | {med['predict']:.1f} s | {med['post']:.1f} s | "
              f"{100 * med['share']:.0f} % ({shares}) | {r0['found']} | {r0['f1']:.3f} | {r0['fp']} | {r0['fn']} | "
              f"{r0['centre_nm']:.2f} nm |")
    print(f"\nmedians of {args.rounds} alternated runs (shares of every run in brackets); tomogram {args.tomogram}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
