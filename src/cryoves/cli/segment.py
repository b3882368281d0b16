"""``cryoves segment``: find the vesicles of one or more tomograms and write the results.

For each ``TOMO.mrc`` (into ``DIR``, or ``DIR/<stem>/`` when several tomograms are given):

- ``<stem>_vesicles.csv``   every vesicle row (accepted and removed), voxels and nm    (csv)
- ``<stem>_labels.mrc``     accepted vesicles as filled spheres, uint16, id = table id (labels)
- ``<stem>_pyto.mrc``       Pyto labels: region 1, active zone 2, vesicles from 10     (pyto)
- ``<stem>_vesicles.star``  RELION-style STAR of the accepted centres                  (star)
- ``<stem>_vesicles.mod``   IMOD model, one sphere per accepted vesicle                (mod)
- ``<stem>_segment.json``   parameters, voxel size, threshold, counts, timings (always)
- with ``--save-intermediates``: ``<stem>_probability.mrc`` and
  ``<stem>_labels_{global,adaptive,refine,outliers}.mrc``

Inputs are never modified and never overwritten. Existing results are not replaced unless
``--overwrite`` is given. With several tomograms, a failing one is reported and the others
are still processed; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from cryoves.cli import CliError

FORMATS = ("csv", "labels", "pyto", "star", "mod")
_FORMAT_FILES = {"csv": "_vesicles.csv", "labels": "_labels.mrc", "pyto": "_pyto.mrc",
                 "star": "_vesicles.star", "mod": "_vesicles.mod"}
_MRC_ENDINGS = (".mrc.gz", ".rec.gz", ".map.gz", ".mrc.bz2", ".rec.bz2", ".map.bz2",
                ".mrc", ".rec", ".map", ".mrcs", ".st", ".ali")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segment`` on the ``cryoves`` sub-command parser."""
    p = subparsers.add_parser(
        "segment",
        help="find the synaptic vesicles of tomograms and fit each as a sphere",
        description=("Run the whole CryoVesNet method (U-Net prediction, global and adaptive "
                     "threshold, sphere refinement, outlier removal) on each tomogram and write "
                     "the vesicle table (CSV), labels (MRC), Pyto labels, a STAR file and an IMOD "
                     "model. Input files are never modified."),
        epilog=("Example: cryoves segment tomo.rec --out results --weights cryovesnet/weights.h5\n"
                "Formats are described in docs/outputs.md."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tomograms", nargs="+", metavar="TOMO.mrc", help="tomogram(s) (MRC, .rec, .map, .mrc.gz)")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="output folder (created if missing); one subfolder per tomogram when several are given")
    p.add_argument("--voxel-size", type=float, default=None, metavar="NM",
                   help="voxel size in nm (overrides the MRC header; required when the header has none)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="U-Net weights: cryoves NAME.weights.h5 (with NAME.json) or the reference "
                        "CryoVesNet weights.h5 (default: the weights shipped with cryoves)")
    p.add_argument("--mask", action="append", default=None, metavar="REGION.mrc",
                   help="region mask on the tomogram's grid (non-zero = search here; a Pyto file with "
                        "1 = region and 2 = active zone also works); give it once per tomogram, in order")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (8 flips, 8x slower prediction)")
    p.add_argument("--p-threshold", type=float, default=None, metavar="P",
                   help="outlier p-value threshold: vesicles with a lower Mahalanobis p-value are re-fitted "
                        "or removed (default: that of cryoves.outliers.filter_outliers, 0.01 at the time of "
                        "writing; the paper used 0.3)")
    p.add_argument("--min-radius-nm", type=float, default=None, metavar="NM",
                   help="smallest vesicle radius in nm (default 12, the paper's)")
    p.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"comma-separated outputs among {','.join(FORMATS)} (default: all)")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also write the probability map and the label volume of every stage")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _stem(path: Path) -> str:
    name = path.name
    for ending in _MRC_ENDINGS:
        if name.lower().endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return path.stem or name


def _parse_formats(text: str) -> tuple[str, ...]:
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in FORMATS]
    if unknown:
        raise CliError(f"unknown format(s) {', '.join(unknown)} in --formats; choose among {', '.join(FORMATS)}")
    if not items:
        raise CliError(f"--formats is empty; choose among {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def output_paths(stem: str, folder: Path, formats, save_intermediates: bool) -> dict[str, Path]:
    """Every file ``segment`` writes for one tomogram: key -> path."""
    out = {f: folder / f"{stem}{_FORMAT_FILES[f]}" for f in formats}
    out["json"] = folder / f"{stem}_segment.json"
    if save_intermediates:
        out["probability"] = folder / f"{stem}_probability.mrc"
        for s in ("global", "adaptive", "refine", "outliers"):
            out[f"labels_{s}"] = folder / f"{stem}_labels_{s}.mrc"
    return out


class _Bars:
    """One tqdm progress bar per pipeline stage, on stderr."""

    def __init__(self, prefix: str, disable: bool):
        self.prefix, self.disable = prefix, disable
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=max(total, 1), desc=f"{self.prefix} {stage:<8}", file=sys.stderr,
                            leave=False, dynamic_ncols=True, disable=None)
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = min(done, self.bar.total)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _warn(msg: str) -> None:
    print(f"cryoves segment: warning: {msg}", file=sys.stderr)


def _load_model(weights):
    from cryoves.model import load_model

    try:
        return load_model(weights)
    except FileNotFoundError as err:
        if weights is None:
            raise CliError(f"no default U-Net weights ship with this installation ({err}). Pass weights with "
                           f"--weights PATH: cryoves NAME.weights.h5 (its NAME.json card next to it) or the "
                           f"reference CryoVesNet weights.h5") from None
        raise CliError(f"--weights: {err}") from None
    except (ValueError, OSError) as err:
        raise CliError(f"--weights {weights}: {err}") from None


def _segment_one(tomo_path: Path, mask_path, folder: Path, paths: dict, args, params, model, formats) -> dict:
    """Read, segment, write one tomogram; returns a summary dict. Raises ValueError/OSError."""
    from cryoves import __version__
    from cryoves import io as cio
    from cryoves.pipeline import segment

    stem = _stem(tomo_path)
    timings = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tomogram, vs = cio.read_tomogram(tomo_path, args.voxel_size)
    for w in caught:
        _warn(str(w.message))
    mask = None
    if mask_path is not None:
        mask, mask_vs = cio.read_labels(mask_path, check_shape=tomogram.shape)
        if mask_vs is not None and abs(mask_vs - vs) > 0.01 * vs:
            _warn(f"{mask_path.name}: header voxel size {mask_vs:g} nm differs from the tomogram's {vs:g} nm")
    timings["read"] = time.perf_counter() - t0

    bars = _Bars(stem, args.quiet)
    try:
        result = segment(tomogram, vs, model, params=params, mask=mask,
                         keep_intermediates=args.save_intermediates, progress=bars)
    finally:
        bars.close()
    timings.update({k: v for k, v in result.timings.items() if k != "total"})

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    ow = args.overwrite
    table, shape = result.table, tuple(tomogram.shape)
    if "csv" in formats:
        cio.write_vesicles_csv(paths["csv"], table, overwrite=ow)
    if "labels" in formats:
        cio.write_labels_mrc(paths["labels"], result.labels, vs, overwrite=ow)
    if "pyto" in formats:
        region = az = None
        if mask is not None:
            import numpy as np

            region = mask != 0
            values = set(np.unique(mask).tolist())
            if 2 in values and values <= {0, 1, 2}:
                az = mask == 2
        cio.write_pyto_labels(paths["pyto"], table, shape, vs, mask=region, active_zone=az, overwrite=ow)
    if "star" in formats:
        cio.write_star(paths["star"], table, tomo_name=stem, overwrite=ow)
    if "mod" in formats:
        cio.write_imod_model(paths["mod"], table, shape, vs, overwrite=ow)
    if args.save_intermediates:
        cio.write_mrc(paths["probability"], result.probability, vs, overwrite=ow,
                      label=f"cryoves {__version__} vesicle probability")
        for s, vol in result.stage_labels.items():
            cio.write_labels_mrc(paths[f"labels_{s}"], vol, vs, overwrite=ow,
                                 label=f"cryoves {__version__} labels after stage {s}")
    timings["write"] = time.perf_counter() - t0
    summary = {
        "cryoves_version": __version__,
        "tomogram": str(tomo_path.resolve()),
        "mask": None if mask_path is None else str(Path(mask_path).resolve()),
        "shape": list(shape),
        "voxel_size_nm": vs,
        "weights": None if model is None else str(getattr(model, "path", None) or getattr(model.card, "name", "")),
        "threshold": result.threshold if result.threshold == result.threshold else None,
        "n_accepted": result.n_accepted,
        "n_removed": result.n_removed,
        "removed_by_stage": result.removed_by_stage(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "params": params.to_dict(),
        "outputs": {k: p.name for k, p in paths.items() if k != "json"},
    }
    from cryoves.io import _atomic_text  # same atomic, no-clobber rules as every writer

    with _atomic_text(paths["json"], ow) as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    return summary


def run(args) -> int:
    """Run ``cryoves segment``; returns the exit status (0 ok, 1 some tomograms failed)."""
    from cryoves import io as cio
    from cryoves.pipeline import SegmentParams

    formats = _parse_formats(args.formats)
    tomos = [Path(t) for t in args.tomograms]
    masks = [Path(m) for m in args.mask] if args.mask else [None] * len(tomos)
    if len(masks) != len(tomos):
        raise CliError(f"--mask given {len(masks)} time(s) for {len(tomos)} tomogram(s); give one mask per "
                       f"tomogram, in the same order")
    try:
        changes = {"tta": args.tta}
        if args.p_threshold is not None:
            changes["p_threshold"] = args.p_threshold
        if args.min_radius_nm is not None:
            changes["min_radius_nm"] = args.min_radius_nm
        params = SegmentParams().replace(**changes)
    except ValueError as err:
        raise CliError(str(err).replace("SegmentParams.p_threshold", "--p-threshold")
                       .replace("SegmentParams.min_radius_nm", "--min-radius-nm")) from None
    if args.voxel_size is not None and not (args.voxel_size > 0):
        raise CliError(f"--voxel-size must be a positive number of nm, got {args.voxel_size}")

    # inputs: never written to, whatever the output names
    for p in tomos + [m for m in masks if m is not None]:
        cio.protect_path(p)
    stems = [_stem(t) for t in tomos]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if len(tomos) > 1 and dup:
        raise CliError(f"several tomograms share the name {', '.join(dup)}: their outputs would collide "
                       f"(DIR/<name>/); rename or run them separately")

    # output folder: checked before any computation
    out = Path(args.out)
    try:
        cio.check_output_dir(out)
    except OSError as err:
        raise CliError(str(err)) from None
    single = len(tomos) == 1
    plan = []
    for tomo, mask, stem in zip(tomos, masks, stems):
        folder = out if single else out / stem
        paths = output_paths(stem, folder, formats, args.save_intermediates)
        plan.append((tomo, mask, folder, paths))
    if not args.overwrite:
        clashes = [(t, [p for p in paths.values() if p.exists()]) for t, _, _, paths in plan]
        clashes = [(t, ps) for t, ps in clashes if ps]
        if clashes:
            lines = "; ".join(f"{t.name}: {', '.join(p.name for p in ps)}" for t, ps in clashes)
            raise CliError(f"result files already exist in {out} ({lines}); pass --overwrite to replace them "
                           f"or choose another --out")
    for tomo, mask, _, paths in plan:
        for p in paths.values():
            if cio.is_protected(p):
                raise CliError(f"output {p} would replace the input file {p.name}; choose another --out")

    # inputs that do not exist fail now, the others are read one by one
    model = None
    failures: list[tuple[Path, str]] = []
    summaries = []
    t_start = time.perf_counter()
    for i, (tomo, mask, folder, paths) in enumerate(plan):
        if not args.quiet and not single:
            print(f"[{i + 1}/{len(plan)}] {tomo}", file=sys.stderr)
        try:
            if not tomo.is_file():
                raise FileNotFoundError(f"tomogram file not found: {tomo}")
            if mask is not None and not mask.is_file():
                raise FileNotFoundError(f"mask file not found: {mask}")
            cio.read_mrc_header(tomo)  # fail fast on non-MRC / truncated files before loading the model
            if model is None:
                model = _load_model(args.weights)
            summaries.append((tomo, folder, _segment_one(tomo, mask, folder, paths, args, params, model, formats)))
        except CliError:
            raise
        except (ValueError, OSError, TypeError) as err:
            msg = str(err)
            if single:
                raise CliError(msg) from None
            if str(tomo) not in msg:
                msg = f"{tomo}: {msg}"
            print(f"cryoves segment: error: {msg}", file=sys.stderr)
            failures.append((tomo, msg))

    for tomo, folder, s in summaries:
        t = s["timings_s"]
        removed = ", ".join(f"{n} by {st}" for st, n in s["removed_by_stage"].items())
        thr = f"{s['threshold']:.2f}" if s["threshold"] is not None else "none"
        print(f"{tomo.name}: {s['n_accepted']} vesicles found, {s['n_removed']} removed"
              + (f" ({removed})" if removed else "") + f"; threshold {thr}; voxel {s['voxel_size_nm']:g} nm")
        print("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
        print(f"  results in {folder}")
    if not single:
        print(f"{len(summaries)} of {len(plan)} tomograms segmented in {time.perf_counter() - t_start:.1f} s")
    if failures:
        print(f"cryoves segment: {len(failures)} tomogram(s) failed:", file=sys.stderr)
        for tomo, msg in failures:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0
