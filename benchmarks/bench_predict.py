"""Benchmark of cryoves.predict.predict_probability.

Times the prediction of a synthetic tomogram (default 200 x 512 x 512 voxels at the
model's voxel size, so no resampling) and prints:

- input voxels per second (end to end: normalisation, tiling, network, blending),
- the tile plan and its overhead factor (voxels pushed through the network / input voxels),
- the network's own throughput (voxels pushed through it per second of wall time).

Usage::

    python benchmarks/bench_predict.py                       # 200 x 512 x 512, reference weights
    python benchmarks/bench_predict.py --shape 64,256,256 --weights path/to/NAME.weights.h5
    python benchmarks/bench_predict.py --random               # untrained default U-Net

Weights: ``--weights`` if given, else the reference CryoVesNet weights beside the
repository (``../shared/reference/cryovesnet-weights/weights.h5``) if present, else the
shipped default, else a randomly initialised U-Net of the default architecture (the
speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REFERENCE = (Path(__file__).resolve().parents[1].parent / "shared" / "reference"
             / "cryovesnet-weights" / "weights.h5")


def _model(args):
    from cryoves.model import load_model, new_model

    if args.random:
        return new_model(name="random", seed=0), "random"
    if args.weights:
        return load_model(args.weights), args.weights
    if REFERENCE.is_file():
        return load_model(REFERENCE), str(REFERENCE)
    try:
        return load_model(), "default"
    except FileNotFoundError:
        return new_model(name="random", seed=0), "random (no weights found)"


def main(argv=None) -> int:
    from cryoves.predict import DEFAULT_MAX_TILE_VOXELS, plan_tiles, predict_probability, tile_budget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="200,512,512", help="Z,Y,X (default 200,512,512)")
    ap.add_argument("--weights", default=None, help="weights file (default: reference/default)")
    ap.add_argument("--random", action="store_true", help="use an untrained U-Net")
    ap.add_argument("--max-tile-voxels", type=int, default=DEFAULT_MAX_TILE_VOXELS)
    ap.add_argument("--tile-shape", default=None, help="Z,Y,X tile shape (default: planned)")
    ap.add_argument("--tta", action="store_true", help="8-flip test-time augmentation")
    ap.add_argument("--voxel-size", type=float, default=None,
                    help="voxel size of the input (nm); default: the model's (no resampling)")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    tile_shape = None if args.tile_shape is None else tuple(
        int(v) for v in args.tile_shape.split(","))

    model, source = _model(args)
    vs = model.voxel_size_nm if args.voxel_size is None else args.voxel_size
    rng = np.random.default_rng(0)
    tomo = rng.normal(size=shape).astype(np.float32)
    n_in = int(np.prod(shape))
    factor = vs / model.voxel_size_nm
    model_shape = shape if abs(factor - 1) <= 0.01 else tuple(
        max(1, int(round(s * factor))) for s in shape)
    plan = plan_tiles(model_shape, divisor=model.divisor, halo=model.receptive_field[1],
                      tile_shape=tile_shape, max_tile_voxels=tile_budget(model_shape, args.max_tile_voxels, model))
    n_flip = 8 if args.tta else 1
    pushed = plan.voxels_computed * n_flip

    # warm-up: builds the folded network and traces it once (not timed)
    predict_probability(tomo[:16, :32, :32], model.voxel_size_nm, model)
    batches = []
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    predict_probability(tomo, vs, model, tile_shape=tile_shape, tta=args.tta,
                        max_tile_voxels=args.max_tile_voxels,
                        progress=lambda s, d, t: batches.append((time.perf_counter(), d, t)))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    load1 = os.getloadavg()[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    print(f"weights          : {source}")
    print(f"input            : {shape} at {vs} nm ({n_in / 1e6:.1f} M voxels); "
          f"model grid {model_shape} at {model.voxel_size_nm} nm")
    print(f"threads          : {os.cpu_count()} CPUs visible")
    print(f"receptive field  : width {model.receptive_field[0]}, radius "
          f"{model.receptive_field[1]} voxels (halo)")
    print(f"tiles            : {plan.n_tiles} x {plan.tile_shape}{' x 8 flips' if args.tta else ''}"
          f" (per axis {[len(s) for s in plan.starts]})")
    print(f"overhead factor  : {pushed / n_in:.3f} (voxels through the net / input voxels); "
          f"tiling alone: {plan.voxels_computed / np.prod(model_shape):.3f} "
          "(per model-grid voxel, per flip)")
    print(f"wall time        : {wall:.1f} s")
    print(f"input voxels/s   : {n_in / wall / 1e6:.2f} M/s")
    print(f"network voxels/s : {pushed / wall / 1e6:.2f} M/s (incl. normalisation and blending)")
    print(f"CPU time         : {cpu:.1f} s ({cpu / wall:.2f} cores busy on average); "
          f"{pushed / cpu / 1e6:.2f} M network voxels per CPU-second")
    print(f"machine load     : {load0:.1f} -> {load1:.1f} (1-min load average; other "
          "processes share the CPUs when it exceeds the core count)")
    print(f"peak RSS         : {rss:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
