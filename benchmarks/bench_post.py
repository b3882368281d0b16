"""Time the post-processing stages of ``cryoves segment`` on a cached probability map.

Post-processing is everything after the network: global threshold (with the weak-segment test
and the large-vesicle candidates), adaptive threshold, sphere refinement, outliers, and the
label volumes written by ``cryoves segment`` (labels + Pyto). The network runs once per
tomogram: its two maps (main and large-vesicle pass) are cached as ``.npy`` files in
``--cache`` and reused by every later run, so a change to the post-processing can be timed in
seconds and checked against a saved reference table.

Usage::

    python benchmarks/bench_post.py                       # time each stage, compare to the reference
    python benchmarks/bench_post.py --save-reference      # (re)write the reference table
    python benchmarks/bench_post.py --profile global      # cProfile one stage (top 25 by cumulative time)

The tomogram defaults to the 160x384x384 simulation of ``benchmarks/speed.py``
(``/tmp/cryoves_speed/sim_160x384x384_s1/tomogram.mrc``, made by that script). The reference
table is ``<cache>/reference_table.npz`` (every column, voxel units); the comparison is column by column: integer and
text columns exactly, float columns to a relative 1e-6 (summation order may change). Exit
status 1 when the table differs from the reference.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_TOMO = "/tmp/cryoves_speed/sim_160x384x384_s1/tomogram.mrc"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB


def _maps(tomogram, vs, params, cache: Path):
    """The probability maps (predicted once, then read from ``cache``)."""
    from cryoves.pipeline import predict_stage

    p_path, l_path = cache / "probability.npy", cache / "large.npy"
    if not p_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prob, large = predict_stage(tomogram, vs, None, params)
        print(f"predicted in {time.perf_counter() - t0:.1f} s; cached in {cache}")
        np.save(p_path, prob)
        np.save(l_path, large if large is not None else np.zeros(0, np.float32))
    prob = np.load(p_path)
    large = np.load(l_path)
    return prob, (large if large.size else None)


def compare_tables(a, b, rtol: float = 1e-6) -> list[str]:
    """Differences between two tables given as dicts of column arrays (empty list: equal)."""
    out = []
    if set(a) != set(b):
        return [f"columns {sorted(a)} vs {sorted(b)}"]
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape:
            return [f"column {name}: shape {x.shape} vs {y.shape}"]
        if x.dtype.kind == "f":
            bad = ~np.isclose(x, y, rtol=rtol, atol=1e-9, equal_nan=True)
        else:
            bad = x != y
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            out.append(f"column {name}: {int(bad.sum())} rows differ (first row {i}: {x[i]!r} vs {y[i]!r})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tomogram", default=DEFAULT_TOMO)
    ap.add_argument("--cache", default="/tmp/post5")
    ap.add_argument("--save-reference", action="store_true")
    ap.add_argument("--profile", action="append", default=[], choices=["global", "adaptive", "refine", "outliers", "write"],
                    help="cProfile this stage (repeatable)")
    ap.add_argument("--memory", action="store_true",
                    help="trace allocations (tracemalloc, numpy included; slower): print each stage's peak "
                         "above what was held before it, in bytes and in volumes of float32")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the write stage (the minimum is printed; the others consume their input)")
    ap.add_argument("--no-helpers", action="store_true",
                    help="no helper processes (cryoves._workers): the per-vesicle work on threads only")
    args = ap.parse_args(argv)
    from cryoves import _workers

    if args.no_helpers:
        _workers.set_enabled(False)

    from cryoves.io import read_tomogram, write_labels_mrc, write_pyto_labels, write_vesicles_csv
    from cryoves.pipeline import SegmentParams, adaptive_stage, global_stage, outliers_stage, refine_stage
    from cryoves.refine import intensity_normalization
    from cryoves.table import render_labels

    cache = Path(args.cache)
    tomogram, vs = read_tomogram(args.tomogram)
    params = SegmentParams()
    prob, large = _maps(tomogram, vs, params, cache)
    print(f"tomogram {args.tomogram} {tomogram.shape} at {vs} nm; start RSS peak {_rss_gb():.2f} GB")

    state = {}

    def s_global():
        _workers.start_for(tomogram)  # as segment() does: the helpers import during the thresholds
        state["norm"] = intensity_normalization(tomogram)
        g = global_stage(tomogram, prob, vs, params, large=large, normalization=state["norm"])
        state["threshold"], state["labels"] = g.threshold, g.labels

    def s_adaptive():
        # as segment(..., keep_intermediates=False): the global labels are given up
        labels = state.pop("labels")
        # (the code before overwrite_labels had no such keyword: to compare with it)
        kw = {"overwrite_labels": True} if "overwrite_labels" in inspect.signature(adaptive_stage).parameters else {}
        state["adaptive"] = adaptive_stage(prob, labels, state["threshold"], vs, params, **kw)
        del labels

    def s_refine():
        state["refine"] = refine_stage(tomogram, state.pop("adaptive"), vs, params, normalization=state["norm"])

    def s_outliers():
        state["table"] = outliers_stage(tomogram, state["refine"], vs, params, normalization=state["norm"])
        state["final"] = render_labels(state["table"], tomogram.shape)

    def s_write():
        with tempfile.TemporaryDirectory() as d:
            write_labels_mrc(os.path.join(d, "labels.mrc"), state["final"], vs)
            write_pyto_labels(os.path.join(d, "pyto.mrc"), state["table"], tomogram.shape, vs)
            write_vesicles_csv(os.path.join(d, "vesicles.csv"), state["table"])

    stages = {"global": s_global, "adaptive": s_adaptive, "refine": s_refine, "outliers": s_outliers,
              "write": s_write}
    times, cpu = {}, {}
    vol_bytes = 4 * int(np.prod(tomogram.shape))
    if args.memory:
        import tracemalloc

        tracemalloc.start()
    for name, fn in stages.items():
        if args.memory:
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            if name in args.profile:
                pr = cProfile.Profile()
                t0 = time.perf_counter()
                pr.enable()
                fn()
                pr.disable()
                best = min(best, time.perf_counter() - t0)
                pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                best = min(best, time.perf_counter() - t0)
                cpu[name] = time.process_time() - c0
        times[name] = best
        mem = ""
        if args.memory:
            now, peak = tracemalloc.get_traced_memory()
            mem = (f"   traced: held before {held / vol_bytes:.2f}, peak {peak / vol_bytes:.2f}, "
                   f"peak above held {(peak - held) / vol_bytes:.2f} volumes (1 volume = {vol_bytes / 1e6:.0f} MB)")
        print(f"{name:9s} {best:7.2f} s (CPU {cpu.get(name, float('nan')):6.2f} s)   peak RSS so far {_rss_gb():.2f} GB{mem}", flush=True)
    total = sum(times.values())
    n_acc = int(np.sum(state["table"]["status"] == "accepted")) if "status" in state["table"].columns else len(state["table"])
    print(f"post-processing {total:.2f} s (CPU {sum(cpu.values()):.2f} s); {len(state['table'])} rows ({n_acc} accepted); "
          f"load {os.getloadavg()[0]:.1f}")

    ref = cache / "reference_table.npz"
    cols = {k: np.asarray(v) for k, v in state["table"].to_dict(nm=False).items()}
    cols = {k: (v.astype(str) if v.dtype == object else v) for k, v in cols.items()}
    if args.save_reference:
        np.savez(ref, **cols)
        print(f"reference table written: {ref}")
        return 0
    if not ref.exists():
        print(f"no reference table at {ref} (run with --save-reference first)")
        return 0
    with np.load(ref) as z:
        refcols = {k: z[k] for k in z.files}
    diffs = compare_tables(cols, refcols)
    if diffs:
        print("TABLE DIFFERS from the reference:\n  " + "\n  ".join(diffs))
        return 1
    exact = all(np.array_equal(cols[k], refcols[k]) for k in cols)
    print("table equals the reference" + (" bit for bit" if exact else " (floats to 1e-6 relative)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
