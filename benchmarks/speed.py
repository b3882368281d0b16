"""End-to-end speed benchmark of ``cryoves segment`` against the reference inference scheme.

For each size (default 160x384x384 and 200x512x512 voxels at 2.2 nm) a tomogram is simulated
once (``cryoves simulate``, cached under ``--workdir``), then:

1. ``cryoves segment`` runs as a subprocess, timed from process start to exit (every file
   written): the time to its first progress line, the time to the start of prediction (Python
   and TensorFlow import, header checks, reading, model build), each stage (from the run record
   ``<stem>_segment.json``), post-processing (global + adaptive + refine + outliers + write) and
   its share of the total, peak RSS of the process (``os.wait4``), and the network voxels/s
   (voxels pushed through the U-Net by cryoves' tile plan / prediction stage seconds, which
   include the preprocessing and the blending).
2. The reference CryoVesNet inference scheme on the same (folded) network: 64^3 tiles keeping
   the central 24^3, batch 1 (``ceil(Z/24) * ceil(Y/24) * ceil(X/24)`` tiles). By default only
   ``--ref-tiles`` tiles are timed (after a warm-up) and the time is extrapolated by tile count;
   the output says so. ``--ref-tiles 0`` times every tile.

3. cryoves' main prediction pass alone, in the benchmark's process (``predict_probability`` with
   the pipeline's settings: the one probability map that the reference scheme also makes), with
   freed memory kept as ``cryoves segment`` keeps it (``cryoves._memory``).

The ratios printed: reference scheme / cryoves main pass (the same job), reference scheme /
cryoves prediction stage (main pass + large-vesicle pass), and reference scheme / cryoves end
to end. The 1-minute load average (``os.getloadavg``) is printed with each figure:
when it is above the number of cores other work shared them.

Usage (about 5 min on 2 idle cores, the first time 1-2 min more for the simulations)::

    python benchmarks/speed.py                         # print only
    python benchmarks/speed.py --report docs/speed.md  # also rewrite the marked block of docs/speed.md

Only the block between ``<!-- speed.py begin -->`` and ``<!-- speed.py end -->`` of the report
file is replaced (appended at the end when the markers are missing); the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- speed.py begin -->", "<!-- speed.py end -->"
SIZES = ((160, 384, 384), (200, 512, 512))
VOXEL_NM = 2.2
REF_TILE, REF_KEEP = 64, 24
POST = ("global", "adaptive", "refine", "outliers", "write")


def _env() -> dict:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def simulate(shape, workdir: Path, seed: int) -> Path:
    """The simulated tomogram of ``shape`` (made once, then reused)."""
    folder = workdir / f"sim_{'x'.join(map(str, shape))}_s{seed}"
    tomo = folder / "tomogram.mrc"
    if tomo.is_file() and (folder / "params.json").is_file():
        return tomo
    print(f"simulating {shape} at {VOXEL_NM} nm into {folder} ...", flush=True)
    cmd = [sys.executable, "-m", "cryoves", "simulate", str(folder), "--shape", *map(str, shape),
           "--voxel-size", str(VOXEL_NM), "--seed", str(seed), "--quiet", "--overwrite"]
    subprocess.run(cmd, check=True, env=_env())
    return tomo


def run_segment(tomo: Path, out: Path, weights) -> dict:
    """``cryoves segment`` as a subprocess: wall time, line times, peak RSS, run record."""
    cmd = [sys.executable, "-m", "cryoves", "segment", str(tomo), "--out", str(out), "--overwrite",
           "--formats", "csv,labels,pyto,star,mod"]
    if weights:
        cmd += ["--weights", str(weights)]
    load0 = _load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True,
                            bufsize=1)
    lines = []
    for line in proc.stderr:  # not a terminal: one line per stage, flushed
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"cryoves segment failed ({proc.returncode}):\n"
                           + "\n".join(s for _, s in lines) + stdout)
    record = json.loads((out / f"{tomo.stem}_segment.json").read_text())
    first = lines[0][0] if lines else float("nan")
    predict_at = next((t for t, s in lines if s.endswith(": predict ...")), float("nan"))
    return {"wall_s": wall, "first_line_s": first, "predict_starts_s": predict_at,
            "peak_rss_gb": usage.ru_maxrss / 1024 ** 2, "cpu_s": usage.ru_utime + usage.ru_stime,
            "timings_s": record["timings_s"], "n_accepted": record["n_accepted"],
            "load": (load0, _load()), "record": record}


def network_voxels(shape, model) -> tuple[int, object]:
    """Voxels cryoves pushes through the U-Net for a tomogram of ``shape`` at the model's voxel size."""
    from cryoves.predict import DEFAULT_MAX_TILE_VOXELS, plan_tiles, tile_budget

    f = VOXEL_NM / model.voxel_size_nm
    mshape = shape if abs(f - 1) <= 0.01 else tuple(max(1, int(round(s * f))) for s in shape)
    plan = plan_tiles(mshape, divisor=model.divisor, halo=model.receptive_field[1],
                      max_tile_voxels=tile_budget(mshape, DEFAULT_MAX_TILE_VOXELS, model))
    return plan.voxels_computed, plan


def reference_scheme(shape, model, n_time: int) -> dict:
    """Seconds of the reference scheme (64^3 tiles, central 24^3 kept, batch 1) on this network.

    On the Keras graph of the folded network (:meth:`cryoves.model.UNetModel.inference_model`), as
    the reference runs its Keras model: on 64^3 tiles it was 1-2 % faster than cryoves' lighter
    bfloat16 predictor (0.0319-0.0321 against 0.0324-0.0328 s per tile, alternated, 2026-12-01).
    """
    net = model.inference_model()
    n_tiles = math.prod(math.ceil(s / REF_KEEP) for s in shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, REF_TILE, REF_TILE, REF_TILE, 1)).astype(np.float32)
    for _ in range(3):  # warm-up: tracing, memory pools
        net.predict_on_batch(x)
    n = n_tiles if n_time <= 0 else min(n_time, n_tiles)
    load0 = _load()
    t0 = time.perf_counter()
    for i in range(n):
        x[0, 0, 0, 0, 0] = i  # a different input each call
        np.asarray(net.predict_on_batch(x))
    per_tile = (time.perf_counter() - t0) / n
    return {"n_tiles": n_tiles, "timed_tiles": n, "per_tile_s": per_tile, "seconds": per_tile * n_tiles,
            "extrapolated": n < n_tiles, "load": (load0, _load())}


def main_pass(tomo: Path, model) -> dict:
    """Seconds of cryoves' main prediction pass alone, in this process: the one probability map at
    the model's voxel size that the reference scheme also makes (preprocessing, tiling, network
    calls and blending; not the large-vesicle pass, start-up or reading), after a small warm-up."""
    from cryoves._memory import kept_freed_memory
    from cryoves.io import read_tomogram
    from cryoves.pipeline import CHILD_PROCESS_VOXELS, SegmentParams
    from cryoves.predict import predict_probability

    data, vs = read_tomogram(tomo)
    data = np.asarray(data, dtype=np.float32)
    kw = SegmentParams().stage_kwargs("predict", vs)
    predict_probability(data[:40, :96, :96], vs, model, **kw)  # warm-up: tracing, memory pools
    load0 = _load()
    # as `cryoves segment` predicts a tomogram below CHILD_PROCESS_VOXELS: the memory one tile's
    # network frees is kept for the next tile (cryoves._memory)
    with kept_freed_memory(data.size < CHILD_PROCESS_VOXELS):
        t0 = time.perf_counter()
        predict_probability(data, vs, model, **kw)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "load": (load0, _load())}


def fmt_row(shape, seg, ref, net_vox, main) -> dict:
    t = seg["timings_s"]
    post = sum(t.get(k, 0.0) for k in POST)
    return {
        "size": "×".join(map(str, shape)),
        "wall": seg["wall_s"], "first": seg["first_line_s"], "startup": seg["predict_starts_s"],
        "stages": t, "post": post, "post_frac": post / seg["wall_s"],
        "rss": seg["peak_rss_gb"], "tomo_gb": math.prod(shape) * 4 / 1e9,
        "net_vps": net_vox / t["predict"] if t.get("predict") else float("nan"),
        "ref": ref["seconds"], "ref_tiles": ref["n_tiles"], "ref_timed": ref["timed_tiles"],
        "ref_extrapolated": ref["extrapolated"], "ref_per_tile": ref["per_tile_s"],
        "ratio_predict": ref["seconds"] / t["predict"], "ratio_e2e": ref["seconds"] / seg["wall_s"],
        "main": main["seconds"], "load_main": main["load"], "ratio_main": ref["seconds"] / main["seconds"],
        "load_seg": seg["load"], "load_ref": ref["load"], "n": seg["n_accepted"], "cpu": seg["cpu_s"],
    }


def report_block(rows, meta) -> str:
    from cryoves.pipeline import SegmentParams

    large_scale = SegmentParams().large_scale
    lines = [BEGIN, "",
             "## End to end (`benchmarks/speed.py`)", "",
             f"Measured {meta['date']} with `{meta['command']}` ({meta['runtime']:.0f} s): {meta['machine']}. "
             f"Simulated tomograms at {VOXEL_NM} nm (`cryoves simulate`, seeds {meta['seeds']}), weights "
             f"{meta['weights']}. \"Load\" is the 1-minute load average before → after each run; above "
             f"{os.cpu_count()} other work shared the cores.", "",
             "| tomogram | end to end | first line | prediction starts | " + " | ".join(
                 ["predict", "global", "adaptive", "refine", "outliers", "write"])
             + " | post-processing | peak RSS | network voxels/s | vesicles | load |",
             "|---" * 15 + "|"]
    for r in rows:
        t = r["stages"]
        lines.append(
            f"| {r['size']} | **{r['wall']:.1f} s** | {r['first']:.2f} s | {r['startup']:.1f} s | "
            + " | ".join(f"{t.get(k, 0.0):.1f}" for k in ("predict", "global", "adaptive", "refine", "outliers",
                                                           "write"))
            + f" | {r['post']:.1f} s ({100 * r['post_frac']:.0f} %) | {r['rss']:.2f} GB | "
              f"{r['net_vps'] / 1e6:.2f} M | {r['n']} | {r['load_seg'][0]:.1f} → {r['load_seg'][1]:.1f} |")
    lines += ["", "Stage columns are seconds from the run record; \"prediction starts\" is when the "
              "prediction progress line appears (imports, checks, reading, model build before it); "
              "network voxels/s = voxels through the U-Net by cryoves' tile plan / prediction seconds "
              "(preprocessing and blending included).", "",
              "The reference CryoVesNet inference scheme on the same (batch-norm-folded) network: 64³ tiles "
              "keeping the central 24³, batch 1, network calls only (no preprocessing, no start-up):", "",
              "| tomogram | tiles | seconds per tile | reference scheme | cryoves main pass | ÷ cryoves main pass "
              "| ÷ cryoves prediction | ÷ cryoves end to end | load |", "|---" * 9 + "|"]
    for r in rows:
        how = (f"{r['ref']:.0f} s (extrapolated from {r['ref_timed']} tiles)" if r["ref_extrapolated"]
               else f"{r['ref']:.0f} s (all tiles)")
        lines.append(f"| {r['size']} | {r['ref_tiles']} | {r['ref_per_tile']:.3f} | {how} | {r['main']:.1f} s | "
                     f"**{r['ratio_main']:.1f}×** | **{r['ratio_predict']:.1f}×** | **{r['ratio_e2e']:.1f}×** | "
                     f"{r['load_ref'][0]:.1f} → {r['load_ref'][1]:.1f} (main pass {r['load_main'][0]:.1f} → "
                     f"{r['load_main'][1]:.1f}) |")
    stage = (f"the main pass plus the large-vesicle pass (the network again on the tomogram shrunk to "
             f"{large_scale:g}), which the reference does not run" if large_scale else "the main pass")
    lines += ["", "\"Cryoves main pass\" is timed in the benchmark's own process after the reference scheme: "
              "`predict_probability` at the model's voxel size with the pipeline's settings (the card's "
              "preprocessing, tiling, network calls, blending; freed memory kept as `cryoves segment` keeps it), "
              "i.e. the same job as the reference scheme "
              "(one probability map), which is timed on network calls only. \"Prediction\" is the "
              f"`predict` stage of `cryoves segment`: {stage}."]
    loads = [x for r in rows for x in (*r["load_seg"], *r["load_ref"], *r["load_main"])]
    if loads and max(loads) > os.cpu_count():
        lines += ["", f"**Other work shared the {os.cpu_count()} cores during these runs** (load up to "
                      f"{max(loads):.1f}): the times are longer than on an idle machine, and the ratios compare "
                      "runs made under different loads."]
    lines += ["", END]
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else "# Speed and memory\n"
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join("x".join(map(str, s)) for s in SIZES),
                    help="comma-separated ZxYxX sizes (default 160x384x384,200x512x512)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cryoves_speed"),
                    help="where the simulated tomograms are cached and the results written (default: %(default)s)")
    ap.add_argument("--weights", default=None, help="weights for both schemes (default: cryoves' default)")
    ap.add_argument("--ref-tiles", type=int, default=40,
                    help="reference-scheme tiles to time, then extrapolate by tile count (0: all) (default 40)")
    ap.add_argument("--seed", type=int, default=1, help="first simulation seed (default 1; +1 per size)")
    ap.add_argument("--report", default=None, metavar="MD",
                    help="rewrite the speed.py block of this Markdown file (e.g. docs/speed.md)")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    tomos = [simulate(s, work, args.seed + i) for i, s in enumerate(sizes)]

    # cryoves end to end first, each in its own process (nothing else running from here)
    segs = []
    for shape, tomo in zip(sizes, tomos):
        print(f"cryoves segment {tomo} ...", flush=True)
        segs.append(run_segment(tomo, work / f"out_{'x'.join(map(str, shape))}", args.weights))
        s = segs[-1]
        print(f"  end to end {s['wall_s']:.1f} s (first line {s['first_line_s']:.2f} s, prediction starts "
              f"{s['predict_starts_s']:.1f} s), stages {s['timings_s']}, peak RSS {s['peak_rss_gb']:.2f} GB, "
              f"load {s['load'][0]} -> {s['load'][1]}", flush=True)

    # then the reference scheme in this process
    sys.path.insert(0, str(ROOT / "src"))
    from cryoves.model import get_model

    model = get_model(args.weights)
    rows = []
    for shape, seg, tomo in zip(sizes, segs, tomos):
        ref = reference_scheme(shape, model, args.ref_tiles)
        main = main_pass(tomo, model)
        net_vox, plan = network_voxels(shape, model)
        rows.append(fmt_row(shape, seg, ref, net_vox, main))
        r = rows[-1]
        print(f"{r['size']}: reference scheme {ref['n_tiles']} tiles x {ref['per_tile_s']:.3f} s = {r['ref']:.0f} s"
              + (f" (extrapolated from {ref['timed_tiles']} tiles)" if ref["extrapolated"] else "")
              + f", load {ref['load'][0]} -> {ref['load'][1]}")
        print(f"  cryoves: {plan.n_tiles} tiles of {plan.tile_shape}, {net_vox / math.prod(shape):.3f}x overhead, "
              f"{r['net_vps'] / 1e6:.2f} M network voxels/s; post-processing {r['post']:.1f} s "
              f"({100 * r['post_frac']:.0f} % of {r['wall']:.1f} s)")
        print(f"  ratios: reference / cryoves main pass ({r['main']:.1f} s) {r['ratio_main']:.1f}x, "
              f"reference / cryoves prediction {r['ratio_predict']:.1f}x, "
              f"reference / cryoves end to end {r['ratio_e2e']:.1f}x")
    runtime = time.perf_counter() - t_run
    print(f"benchmark runtime {runtime:.0f} s")
    if args.report:
        cpu = platform.processor() or platform.machine()
        meta = {"date": datetime.date.today().isoformat(), "runtime": runtime,
                "command": "python benchmarks/speed.py --report docs/speed.md",
                "machine": f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, no GPU used"
                if not _gpu_names() else f"GPU {', '.join(_gpu_names())}",
                "seeds": ", ".join(str(args.seed + i) for i in range(len(sizes))),
                "weights": args.weights or "cryoves' default"}
        write_report(Path(args.report), report_block(rows, meta))
        print(f"wrote the speed.py block of {args.report}")
    return 0


def _gpu_names() -> list:
    from cryoves._tf import import_tensorflow

    return [d.name for d in import_tensorflow().config.list_physical_devices("GPU")]


if __name__ == "__main__":
    sys.exit(main())
