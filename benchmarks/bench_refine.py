"""Benchmark of the post-processing core: sphere refinement of many vesicles, global threshold.

Run from the repository root::

    python benchmarks/bench_refine.py                 # 1000 vesicles, refine + outliers
    python benchmarks/bench_refine.py --n 300         # fewer
    python benchmarks/bench_refine.py --global-shape 200 512 512   # also time global_threshold

Synthetic vesicles (tests/_synthetic.py: dark bilayer, bright fringe, correlated noise) are
refined from starts 2-4 voxels off with radii 20 % wrong; the script prints wall time, time per
vesicle, and the centre / radius errors. Single-threaded numpy/scipy (set OMP_NUM_THREADS=1 for a
strict one-core figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _synthetic import draw_vesicles, probability_from_spheres, random_vesicles  # noqa: E402

from cryoves import VesicleTable  # noqa: E402
from cryoves.outliers import filter_outliers  # noqa: E402
from cryoves.refine import fit_sphere_at, intensity_normalization, refine_spheres  # noqa: E402
from cryoves.threshold import global_threshold  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of vesicles (default 1000)")
    ap.add_argument("--noise", type=float, default=1.0, help="noise sd in units of the membrane depth")
    ap.add_argument("--voxel-size", type=float, default=2.0)
    ap.add_argument("--radius-range", type=float, nargs=2, default=(7.0, 11.0), metavar=("MIN", "MAX"),
                    help="vesicle radii in voxels (default 7 11; try 16 24 for ~1 nm voxels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--global-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="also time global_threshold on a volume of this shape")
    a = ap.parse_args(argv)

    # volume: room for each vesicle (~26^3 voxels for radii 7-11)
    room = 2.4 * a.radius_range[1]
    depth = int(max(128, 5 * room))
    side = int(np.ceil((a.n * room ** 3 / depth) ** 0.5))
    shape = (depth, side, side)
    t0 = time.perf_counter()
    centers, radii = random_vesicles(shape, a.n, r_range=tuple(a.radius_range), min_gap=2, seed=a.seed,
                                     max_tries=50 * a.n)
    tomo = draw_vesicles(shape, centers, radii, noise=a.noise, seed=a.seed + 1)
    t_make = time.perf_counter() - t0
    n = len(centers)
    rng = np.random.default_rng(a.seed + 2)
    d = rng.standard_normal(centers.shape)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    c0 = centers + d * rng.uniform(2, 4, n)[:, None]
    r0 = radii * rng.choice([0.8, 1.2], n)
    start = VesicleTable.from_arrays(c0, r0, voxel_size=a.voxel_size)
    print(f"synthetic volume {shape}, {n} vesicles, noise {a.noise} (made in {t_make:.1f} s)")

    t0 = time.perf_counter()
    norm = intensity_normalization(tomo)
    out = refine_spheres(tomo, start, a.voxel_size, normalization=norm)
    t_ref = time.perf_counter() - t0
    cerr = np.linalg.norm(out.centers - centers, axis=1)
    rerr = out.radii - radii
    print(f"refine_spheres: {t_ref:.2f} s total, {1000 * t_ref / n:.1f} ms per vesicle")
    print(f"  centre error mean {cerr.mean():.2f} median {np.median(cerr):.2f} max {cerr.max():.2f} voxels; "
          f"{np.mean(cerr < 1):.1%} within 1 voxel")
    print(f"  radius error mean {rerr.mean():+.2f} max |{np.abs(rerr).max():.2f}| voxels; "
          f"{np.mean(np.abs(rerr) < 1):.1%} within 1 voxel")

    t0 = time.perf_counter()
    filt = filter_outliers(tomo, out, a.voxel_size, normalization=norm, min_radius_nm=10.0)
    t_out = time.perf_counter() - t0
    print(f"filter_outliers: {t_out:.2f} s, removed {int(np.sum(filt['status'] == 'removed'))} of {n}")

    clicks = []
    for k in range(min(n, 50)):
        t0 = time.perf_counter()
        fit_sphere_at(tomo, centers[k] + rng.uniform(-2, 2, 3), a.voxel_size, normalization=norm)
        clicks.append(time.perf_counter() - t0)
    print(f"fit_sphere_at: median {1000 * np.median(clicks):.0f} ms, max {1000 * np.max(clicks):.0f} ms per click")

    if a.global_shape:
        gshape = tuple(a.global_shape)
        gc, gr = random_vesicles(gshape, 400, r_range=(7, 11), seed=a.seed + 3, max_tries=20000)
        gt = draw_vesicles(gshape, gc, gr, noise=a.noise, correlated=0, seed=a.seed + 4)
        gp = probability_from_spheres(gshape, gc, gr - 1.0, noise=0.01)
        t0 = time.perf_counter()
        res = global_threshold(gt, gp)
        t_g = time.perf_counter() - t0
        print(f"global_threshold {gshape}: {t_g:.2f} s, threshold {res.threshold:.2f}, "
              f"{res.n_segments} segments")


if __name__ == "__main__":
    main()
