"""Benchmark of the editing core (cryoves.edit.VesicleEditor) on a full-size tomogram.

Run from the repository root::

    python benchmarks/bench_editor_core.py                          # 300 x 1000 x 1000, 1000 vesicles
    python benchmarks/bench_editor_core.py --shape 100 500 500 --n 250 --reps 20   # quicker

The tomogram is a float32 memory map (a file in a temporary folder, deleted at the end) made by
tiling one block of synthetic vesicles (tests/_synthetic.py: dark bilayer, bright fringe,
correlated noise; radii 7-11 voxels at 2 nm). ``--n`` of the tiled vesicles form the table being
edited; the others are "missed" vesicles that ``add_at`` is clicked on (1-2 voxels off their
centre). The editor writes its edit log (fsync per edit) and autosaves the table (background
thread), as in use. Timed per call: ``add_at`` (sphere fit + label painting), ``remove``,
``undo``, ``redo``, ``move``, ``resize``, ``id_at``; the script prints p50 / p95 / max of the wall
time and p50 / p95 of the CPU time of the editing thread (which does not count waiting for a
busy CPU or for the disk), in ms.
Display (napari redraw) is not part of this core benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _synthetic import draw_vesicles, random_vesicles  # noqa: E402

from cryoves.edit import NoMembraneFound, VesicleEditor  # noqa: E402
from cryoves.table import VesicleTable  # noqa: E402


def build(folder: Path, shape, tile, n: int, per_tile_missed: int, voxel_size: float, seed: int):
    """Tiled memmap tomogram, the table of ``n`` vesicles and the centres of the missed ones."""
    shape = np.array(shape)
    tile = np.array(tile)
    reps = np.ceil(shape / tile).astype(int)
    n_tiles = int(np.prod(reps))
    per_tile = int(np.ceil(n / n_tiles)) + per_tile_missed
    centers, radii = random_vesicles(tuple(tile), per_tile, r_range=(7.0, 11.0), min_gap=2, seed=seed,
                                     margin=12, max_tries=200 * per_tile)
    if len(centers) < per_tile:
        raise SystemExit(f"only {len(centers)} vesicles fit in a tile of {tuple(tile)}; use a larger --tile")
    block = draw_vesicles(tuple(tile), centers, radii, noise=1.0, seed=seed + 1)
    path = folder / "tomogram.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=tuple(shape))
    all_c, all_r, is_missed = [], [], []
    for iz in range(reps[0]):
        for iy in range(reps[1]):
            for ix in range(reps[2]):
                o = tile * [iz, iy, ix]
                e = np.minimum(o + tile, shape)
                mm[o[0]:e[0], o[1]:e[1], o[2]:e[2]] = block[:e[0] - o[0], :e[1] - o[1], :e[2] - o[2]]
                c = centers + o
                inside = np.all(c + radii[:, None] < e, axis=1)
                all_c.append(c[inside])
                all_r.append(radii[inside])
                miss = np.zeros(len(centers), bool)
                miss[-per_tile_missed:] = True
                is_missed.append(miss[inside])
    mm.flush()
    del mm
    c, r, miss = np.concatenate(all_c), np.concatenate(all_r), np.concatenate(is_missed)
    keep = np.flatnonzero(~miss)[:n]
    table = VesicleTable.from_arrays(c[keep], r[keep], voxel_size=voxel_size, stage="refine")
    tomo = np.memmap(path, dtype=np.float32, mode="r", shape=tuple(shape))
    return tomo, table, c[miss]


class Clock:
    """Wall time and CPU time of the calling thread for one call."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.thread_time() - self.c0
        return False


def stats(name: str, clocks: list) -> str:
    w = np.array([c.wall for c in clocks]) * 1e3
    c = np.array([c.cpu for c in clocks]) * 1e3
    return (f"{name:<8} n={len(w):3d}  wall p50 {np.percentile(w, 50):6.1f}  p95 {np.percentile(w, 95):6.1f}  "
            f"max {w.max():6.1f} ms | cpu p50 {np.percentile(c, 50):6.1f}  p95 {np.percentile(c, 95):6.1f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 1000, 1000), metavar=("Z", "Y", "X"))
    ap.add_argument("--tile", type=int, nargs=3, default=(150, 250, 250), metavar=("Z", "Y", "X"),
                    help="block of synthetic vesicles tiled to --shape (default 150 250 250)")
    ap.add_argument("--n", type=int, default=1000, help="vesicles in the edited table (default 1000)")
    ap.add_argument("--reps", type=int, default=60, help="timed calls per operation (default 60)")
    ap.add_argument("--voxel-size", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the memmap, log and autosave (default: system temp)")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="cryoves-bench-editor-") as d:
        d = Path(d)
        t0 = time.perf_counter()
        per_tile_missed = max(2, int(np.ceil(a.reps / np.prod(np.ceil(np.array(a.shape) / a.tile)))) + 1)
        tomo, table, missed = build(d, a.shape, a.tile, a.n, per_tile_missed, a.voxel_size, a.seed)
        print(f"tomogram {tomo.shape} float32 memmap ({tomo.nbytes / 2**30:.2f} GiB), {len(table)} vesicles, "
              f"{len(missed)} missed ones to click; made in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        ed = VesicleEditor(tomo, table, a.voxel_size, log_path=d / "edits.jsonl", autosave_path=d / "vesicles.csv")
        print(f"VesicleEditor(...) (labels rendered, normalisation): {time.perf_counter() - t0:.1f} s; "
              f"labels {ed.labels.dtype} {ed.labels.nbytes / 2**20:.0f} MiB")
        rng = np.random.default_rng(a.seed + 7)
        res: dict[str, list] = {k: [] for k in ("add_at", "remove", "undo", "redo", "move", "resize", "id_at")}
        n_fail = 0
        for k in rng.permutation(len(missed))[:a.reps]:
            click = missed[k] + rng.uniform(-1.5, 1.5, 3)
            try:
                with Clock() as clk:
                    ed.add_at(click)
            except NoMembraneFound:
                n_fail += 1
                continue
            res["add_at"].append(clk)
        ids = [int(i) for i in table.ids]
        for vid in rng.choice(ids, a.reps, replace=False):
            with Clock() as clk:
                ed.id_at(table.centers[table.row_index_of(vid)])
            res["id_at"].append(clk)
            with Clock() as clk:
                ed.remove(int(vid))
            res["remove"].append(clk)
        for _ in range(a.reps):
            with Clock() as clk:
                ed.undo()
            res["undo"].append(clk)
        for _ in range(a.reps):
            with Clock() as clk:
                ed.redo()
            res["redo"].append(clk)
        for vid in rng.choice(ids, a.reps, replace=False):
            row = ed.row(int(vid))
            c = np.array([row["z"], row["y"], row["x"]]) + rng.normal(0, 2, 3)
            with Clock() as clk:
                ed.move(int(vid), np.clip(c, 0, np.array(a.shape) - 1))
            res["move"].append(clk)
            with Clock() as clk:
                ed.resize(int(vid), row["radius"] * rng.uniform(0.8, 1.2))
            res["resize"].append(clk)
        ed.close()
        print(f"add_at found a vesicle at {len(res['add_at'])} of {len(res['add_at']) + n_fail} clicks")
        for name, times in res.items():
            if times:
                print(stats(name, times))
        print(f"undo history: {ed.n_edits} edits, {ed.history_nbytes / 2**20:.1f} MiB")
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs visible, "
              f"load average {os.getloadavg()[0]:.1f} (cpu = CPU time of the editing thread; wall includes the "
              f"log's fsync and waiting for a CPU)")


if __name__ == "__main__":
    main()
