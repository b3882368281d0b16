"""``cryoves segment``: find the vesicles of one or more tomograms and write the results.

For each ``TOMO.mrc`` (into ``DIR``, or ``DIR/<stem>/`` when several tomograms are given), the
files of :mod:`cryoves.export` (names in ``docs/outputs.md``):

- ``<stem>_vesicles.csv``   every vesicle row (accepted and removed), voxels and nm    (csv)
- ``<stem>_labels.mrc``     accepted vesicles as filled spheres, uint16, id = table id (labels)
- ``<stem>_pyto.mrc``       Pyto labels: region 1, active zone 2, vesicles from 10     (pyto)
- ``<stem>_vesicles.star``  RELION-style STAR of the accepted centres                  (star)
- ``<stem>_vesicles.mod``   IMOD model, one sphere per accepted vesicle                (mod)
- ``<stem>_segment.json``   the run record: parameters, voxel size, threshold, counts, timings,
  warnings, the files of the set with their sizes (always; written last)
- with ``--save-intermediates``: ``<stem>_probability.mrc`` and
  ``<stem>_labels_{global,adaptive,refine,outliers}.mrc``

Order of work: arguments, then every input header (voxel size, shape), then the output
folder, each reported at once; then per tomogram: read (NaN/Inf check), load the model (once),
segment, check the result, write the set. Inputs are never modified. Results are written as one
set (:func:`cryoves.export.export_results`): a failed or killed run leaves the previous set
untouched, and an incomplete set left by a killed run is recognised and redone.

Several tomograms (batch): a failing one is reported and the others are still processed;
tomograms whose complete results already exist are skipped unless ``--overwrite`` (so a killed
batch resumes where it stopped); a summary table ends the run, and the exit status is 1 when
any tomogram failed.

With ``--workers N`` (a local dask cluster of N worker processes) or ``--scheduler ADDRESS`` (a
running dask cluster) the tomograms of the plan are distributed, one model per worker; each runs
the same per-tomogram function (:func:`cryoves.batch.segment_one`), and the skipping, the
summary and the exit status are the same (:mod:`cryoves.batch`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from cryoves.batch import INTERMEDIATES as _INTERMEDIATES
from cryoves.batch import RunError, RunOptions, load_model_checked, run_one, stem_of
from cryoves.cli import CliError

FORMATS = ("csv", "labels", "pyto", "star", "mod")

#: Defaults shown by ``--help`` (those of :class:`cryoves.pipeline.SegmentParams`, checked by a
#: test; not imported here so that ``cryoves --help`` and input errors stay fast).
HELP_DEFAULTS = {"p_threshold": 0.01, "min_radius_nm": 12.0}
#: :data:`cryoves.pipeline.CHILD_PROCESS_VOXELS` (checked by a test; not imported, as above): tomograms
#: this large are predicted in a child process, so the U-Net is not loaded here for them.
CHILD_PROCESS_VOXELS = 64 * 2 ** 20


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segment`` on the ``cryoves`` sub-command parser."""
    p = subparsers.add_parser(
        "segment",
        help="find the synaptic vesicles of tomograms and fit each as a sphere",
        description=("Run the whole CryoVesNet method (U-Net prediction, global and adaptive "
                     "threshold, sphere refinement, outlier removal) on each tomogram and write "
                     "the vesicle table (CSV), labels (MRC), Pyto labels, a STAR file and an IMOD "
                     "model, as one set with a run record written last. Input files are never "
                     "modified. With several tomograms, finished ones are skipped (a killed batch "
                     "resumes), failing ones do not stop the others."),
        epilog=("Example: cryoves segment tomo.rec --out results --weights cryovesnet/weights.h5\n"
                "Formats are described in docs/outputs.md."),
        formatter_class=_HelpFormatter)
    p.add_argument("tomograms", nargs="+", metavar="TOMO.mrc", help="tomogram(s) (MRC, .rec, .map, .mrc.gz)")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="output folder (created if missing); one subfolder per tomogram when several are given")
    p.add_argument("--voxel-size", type=float, default=None, metavar="NM",
                   help="voxel size in nm (default: from the MRC header; required when the header has none)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="U-Net weights: cryoves NAME.weights.h5 (with NAME.json) or the reference "
                        "CryoVesNet weights.h5 (default: the weights shipped with cryoves)")
    p.add_argument("--mask", action="append", default=None, metavar="REGION.mrc",
                   help="region mask on the tomogram's grid (non-zero = search here; a Pyto file with "
                        "1 = region and 2 = active zone also works); give it once per tomogram, in order "
                        "(default: no mask, search everywhere)")
    p.add_argument("--invert", action="store_true",
                   help="the tomogram has inverted contrast (dense = bright): negate it before every stage "
                        "(default: off, membranes dark as in a usual cryo-ET reconstruction)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (8 flips, 8x slower prediction) (default: off)")
    p.add_argument("--no-large-pass", action="store_true",
                   help="skip the second, shrunk pass of the U-Net that finds vesicles too large for it at its "
                        "own scale (outer radius above ~28 nm with the default weights); saves about a third "
                        "of the prediction time (default: the pass runs)")
    p.add_argument("--p-threshold", type=float, default=None, metavar="P",
                   help="outlier p-value threshold: vesicles with a lower Mahalanobis p-value are re-fitted "
                        f"or removed (default: {HELP_DEFAULTS['p_threshold']:g}; the paper used 0.3)")
    p.add_argument("--min-radius-nm", type=float, default=None, metavar="NM",
                   help=f"smallest vesicle (outer) radius in nm (default: {HELP_DEFAULTS['min_radius_nm']:g}, the paper's); "
                        "the segment size rule of the adaptive threshold moves with it")
    p.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"comma-separated outputs among {','.join(FORMATS)} (default: all, {','.join(FORMATS)})")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also write the probability map and the label volume of every stage (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing complete results; with several tomograms, redo finished ones "
                        "(default: off: refuse for one tomogram, skip finished ones in a batch)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="distribute the tomograms over a local dask cluster of N single-threaded worker "
                        "processes (one model each; needs pip install \"cryoves[dask]\") (default: none, "
                        "one after the other in this process)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="distribute the tomograms over a running dask cluster, e.g. tcp://node1:8786 "
                        "(its workers must see the input and output paths) (default: none)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output (default: off)")
    return p


def _stem(path: Path) -> str:
    return stem_of(path)


def _parse_formats(text: str) -> tuple[str, ...]:
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in FORMATS]
    if unknown:
        raise CliError(f"unknown format(s) {', '.join(unknown)} in --formats; choose among {', '.join(FORMATS)}")
    if not items:
        raise CliError(f"--formats is empty; choose among {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def output_paths(stem: str, folder: Path, formats, save_intermediates: bool) -> dict[str, Path]:
    """Every file ``segment`` writes for one tomogram: key -> path (the run record is ``"json"``)."""
    from cryoves.export import output_names

    names = output_names(stem, formats, _INTERMEDIATES if save_intermediates else ())
    out = {("json" if k == "record" else k): folder / n for k, n in names.items()}
    return out


class _Bars:
    """One tqdm progress bar per pipeline stage on a terminal; one line per stage otherwise."""

    def __init__(self, prefix: str, disable: bool):
        self.prefix, self.disable = prefix, disable
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return
        if not self.tty:
            if stage != self.stage:
                self.stage = stage
                print(f"{self.prefix}: {stage} ...", file=sys.stderr, flush=True)
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=max(total, 1), desc=f"{self.prefix} {stage:<8}", file=sys.stderr,
                            leave=False, dynamic_ncols=True)
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


def _info(args, msg: str) -> None:
    if not args.quiet:
        print(f"cryoves segment: {msg}", file=sys.stderr, flush=True)


def _load_model(weights):
    try:
        return load_model_checked(weights)
    except RunError as err:
        raise CliError(str(err)) from None


class _ModelLoader:
    """Import TensorFlow and build the U-Net in a background thread while the first tomogram is read.

    Started only once every argument, header and output check has passed. While the thread runs,
    ``sys.stderr`` (when it is the process's own) is a duplicate of the stderr file descriptor: :mod:`cryoves._tf` routes that
    descriptor to a temporary file during the import (to drop TensorFlow's start-up chatter), and
    this process's own messages (progress, errors) must not wait for it or be lost with it.
    :meth:`result` waits for the model and raises the loading error, if any, in the caller's thread.
    """

    def __init__(self, weights):
        self.weights = weights
        self.thread = None
        self.model = None
        self.error = None
        self._saved_stderr = None

    def _work(self) -> None:
        try:
            model = _load_model(self.weights)
            model.inference_model()  # the batch-norm-folded network prediction uses (cached)
            self.model = model
        except BaseException as err:  # re-raised by result() in the caller's thread
            self.error = err

    def start(self) -> None:
        if self.thread is not None:
            return
        try:
            if sys.stderr is not sys.__stderr__:  # already redirected (a caller's, a test's): not on the fd
                raise ValueError
            fd = os.dup(sys.__stderr__.fileno())
            self._saved_stderr = sys.stderr
            sys.stderr.flush()
            sys.stderr = open(fd, "w", buffering=1, encoding=getattr(sys.__stderr__, "encoding", None),
                              errors="backslashreplace", closefd=True)
        except (OSError, ValueError, AttributeError):  # no real stderr: nothing to protect
            self._saved_stderr = None
        self.thread = threading.Thread(target=self._work, name="cryoves-load-model", daemon=True)
        self.thread.start()

    def result(self):
        """The loaded model (loads it here when :meth:`start` was not called)."""
        if self.thread is None:
            self._work()
        else:
            self.thread.join()
            if self._saved_stderr is not None:
                # the duplicate stays open: a logging handler made during the import may hold it
                sys.stderr.flush()
                sys.stderr, self._saved_stderr = self._saved_stderr, None
        if self.error is not None:
            err, self.error = self.error, None
            self.thread = None  # a later call tries again (and raises again)
            raise err
        return self.model


def _check_input_file(path: Path, what: str) -> None:
    """A one-line error for a missing input or a folder given as input."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not an MRC file; give the file itself")
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")


def _predicted_in_child(tomo: Path) -> bool:
    """Whether :func:`cryoves.batch.segment_one` predicts this tomogram in a child process (from its header)."""
    from cryoves import io as cio

    try:
        shape = cio.read_mrc_header(tomo).shape
    except (OSError, ValueError):
        return False
    return math.prod(shape) >= CHILD_PROCESS_VOXELS


def _check_header(tomo: Path, args, min_radius_nm: float) -> list[str]:
    """Validate a tomogram from its header alone (no data read); returns warnings."""
    from cryoves import io as cio
    from cryoves import validate

    _check_input_file(tomo, "tomogram")
    info = cio.read_mrc_header(tomo)
    if len(info.shape) != 3:
        raise ValueError(f"{tomo} holds {len(info.shape)}-D data of shape {info.shape}; cryoves segments "
                         f"3-D tomograms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read_tomogram repeats them
        vs = cio.voxel_size_from_header(info, args.voxel_size)
    return validate.check_shape(info.shape, vs, min_radius_nm=min_radius_nm, name=tomo.name)


def _run_on_cluster(args, plan, options, params, take) -> None:
    """The tomograms of ``plan`` on a dask cluster (:func:`cryoves.batch.run_on_cluster`)."""
    from cryoves.batch import run_on_cluster

    done = []

    def on_result(tomo, outcome):
        done.append(tomo)
        what = ("done" if outcome["status"] == "done" else "FAILED")
        _info(args, f"[{len(done)}/{len(plan)}] {tomo}: {what}")
        take(tomo, outcome)

    where = (f"a local dask cluster of {args.workers} worker(s)" if args.workers is not None
             else f"the dask cluster at {args.scheduler}")
    _info(args, f"{len(plan)} tomogram(s) on {where}; one model per worker")
    try:
        run_on_cluster(plan, options, params, workers=args.workers, scheduler=args.scheduler,
                       on_result=on_result, info=lambda m: _info(args, m))
    except RunError as err:
        raise CliError(str(err)) from None
    except ImportError as err:
        raise CliError(str(err)) from None


def _summary_table(rows) -> str:
    """Fixed-width table: tomogram, status, vesicles, seconds, note."""
    head = ("tomogram", "status", "vesicles", "time (s)", "note")
    body = [(str(r[0]), r[1], "" if r[2] is None else str(r[2]), "" if r[3] is None else f"{r[3]:.1f}", r[4])
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head[:4])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + "  " + head[4]]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b[:4], widths)) + "  " + b[4])
    return "\n".join(lines)


def _remove_if_empty(folders) -> None:
    for f in folders:
        try:
            f.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _check_cluster_options(args) -> None:
    """--workers / --scheduler: valid, not both, and dask installed (checked before any work)."""
    workers, scheduler = getattr(args, "workers", None), getattr(args, "scheduler", None)
    if workers is None and scheduler is None:
        return
    if workers is not None and scheduler is not None:
        raise CliError("give --workers (a local dask cluster) or --scheduler (a running one), not both")
    if workers is not None and workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}")
    if scheduler is not None and not scheduler.strip():
        raise CliError("--scheduler is empty; give the scheduler's address, e.g. tcp://node1:8786")
    try:  # the real import (about a second): a broken installation is reported here too
        import distributed  # noqa: F401
    except ImportError:
        from cryoves.batch import DASK_MISSING

        raise CliError(f"{'--workers' if workers is not None else '--scheduler'}: {DASK_MISSING}") from None


def run(args) -> int:
    """Run ``cryoves segment``; returns the exit status (0 ok, 1 some tomograms failed)."""
    from cryoves import io as cio
    from cryoves import validate
    from cryoves.export import remove_stale_staging, result_state

    t_start = time.perf_counter()
    formats = _parse_formats(args.formats)
    tomos = [Path(t) for t in args.tomograms]
    masks = [Path(m) for m in args.mask] if args.mask else [None] * len(tomos)
    if len(masks) != len(tomos):
        raise CliError(f"--mask given {len(masks)} time(s) for {len(tomos)} tomogram(s); give one mask per "
                       f"tomogram, in the same order")
    if args.voxel_size is not None:
        try:
            validate.check_voxel_size(args.voxel_size, name="--voxel-size")
        except (TypeError, ValueError) as err:
            raise CliError(str(err)) from None
    _check_cluster_options(args)
    min_radius = HELP_DEFAULTS["min_radius_nm"] if args.min_radius_nm is None else args.min_radius_nm
    if not min_radius > 0 or min_radius != min_radius or min_radius == float("inf"):
        raise CliError(f"--min-radius-nm must be a positive, finite number of nm, got {args.min_radius_nm}")
    single = len(tomos) == 1
    _info(args, f"checking {len(tomos)} tomogram(s)" + ("" if single else f" -> {args.out}"))

    # inputs: never written to, whatever the output names
    for p in tomos + [m for m in masks if m is not None]:
        cio.protect_path(p)
    stems = [_stem(t) for t in tomos]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if len(tomos) > 1 and dup:
        raise CliError(f"several tomograms share the name {', '.join(dup)}: their outputs would collide "
                       f"(DIR/<name>/); rename or run them separately")

    # every input header, before the output folder is made and before any heavy import
    failures: dict[Path, str] = {}
    for tomo, mask in zip(tomos, masks):
        try:
            _check_header(tomo, args, min_radius)  # its warnings come again, with the model's field of view
            if mask is not None:
                _check_input_file(mask, "mask")
        except (ValueError, OSError, TypeError) as err:
            msg = str(err)
            if single:
                raise CliError(msg) from None
            if str(tomo) not in msg and tomo.name not in msg:
                msg = f"{tomo}: {msg}"
            print(f"cryoves segment: error: {msg}", file=sys.stderr)
            failures[tomo] = msg

    # output folder and earlier results: checked before any computation
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"output path {out} exists and is not a folder")
    created = [] if out.exists() else [out] + [p for p in out.parents if not p.exists()]
    try:
        return _run_checked(args, tomos, masks, stems, formats, out, single, failures, t_start,
                            result_state, remove_stale_staging, created)
    finally:
        _remove_if_empty([out / s for s in stems if not single] + created)


def _run_checked(args, tomos, masks, stems, formats, out, single, failures, t_start, result_state,
                 remove_stale_staging, created) -> int:
    from cryoves import io as cio
    from cryoves.export import output_names

    try:
        cio.check_output_dir(out)
    except OSError as err:
        raise CliError(str(err)) from None
    plan = []
    skipped = []
    for tomo, mask, stem in zip(tomos, masks, stems):
        folder = out if single else out / stem
        paths = output_paths(stem, folder, formats, args.save_intermediates)
        for p in paths.values():
            if cio.is_protected(p):
                raise CliError(f"output {p} would replace the input file {p.name}; choose another --out")
        if tomo in failures:
            continue
        remove_stale_staging(folder)
        names = output_names(stem, formats, _INTERMEDIATES if args.save_intermediates else ())
        state = result_state(folder, stem, names)
        if state.status == "complete" and not args.overwrite:
            if single:
                raise CliError(f"result files already exist in {folder} "
                               f"({', '.join(p.name for p in state.files)}); pass --overwrite to replace them "
                               f"or choose another --out")
            if state.covers(names):
                _info(args, f"{tomo.name}: finished results in {folder}, skipped (--overwrite redoes them)")
                skipped.append(tomo)
                continue
            msg = (f"{tomo}: results of an earlier run with other formats exist in {folder}; "
                   f"pass --overwrite to replace them")
            print(f"cryoves segment: error: {msg}", file=sys.stderr)
            failures[tomo] = msg
            continue
        if state.status == "incomplete":
            _warn(f"{tomo.name}: the results in {folder} are incomplete ({state.reason}); redoing them")
        plan.append((tomo, mask, folder))

    params_box = []
    model_box = []
    loader = _ModelLoader(args.weights)
    local = [False]  # tomograms segmented in this process (not on a dask cluster)
    large = [False]  # the tomogram at hand is predicted in a child process: no model here

    def get_params():  # the pipeline is imported only now (1.5-3 s), after the first tomogram is read
        if not params_box:
            if local[0] and not model_box and not large[0]:
                # the first tomogram is read and its values checked: TensorFlow is imported and the
                # U-Net built in the background while the pipeline is imported here
                _info(args, "loading the U-Net")
                loader.start()
            from cryoves.pipeline import SegmentParams

            try:
                changes = {"tta": args.tta}
                if args.no_large_pass:
                    changes["large_scale"] = None
                if args.p_threshold is not None:
                    changes["p_threshold"] = args.p_threshold
                params = SegmentParams().replace(**changes)
                if args.min_radius_nm is not None:
                    params = params.for_min_radius(args.min_radius_nm)
                params_box.append(params)
            except ValueError as err:
                raise CliError(str(err).replace("SegmentParams.p_threshold", "--p-threshold")
                               .replace("SegmentParams.min_radius_nm", "--min-radius-nm")) from None
        return params_box[0]

    def get_model():
        if not model_box:
            model_box.append(loader.result())
        return model_box[0]

    options = RunOptions(voxel_size=args.voxel_size, invert=bool(args.invert), formats=formats,
                         save_intermediates=bool(args.save_intermediates),
                         weights=None if args.weights is None else str(args.weights))
    records = {}
    times = {}

    def take(tomo, outcome):  # the outcome of one tomogram, the same for both ways of running
        if outcome["status"] == "done":
            records[tomo] = outcome["record"]
            times[tomo] = outcome["seconds"]
            return
        msg = outcome["error"]
        if single:
            raise CliError(msg)
        if str(tomo) not in msg and tomo.name not in msg:
            msg = f"{tomo}: {msg}"
        print(f"cryoves segment: error: {msg}", file=sys.stderr)
        failures[tomo] = msg

    if plan and (getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None):
        _run_on_cluster(args, plan, options, get_params(), take)
    else:
        local[0] = True
        for i, (tomo, mask, folder) in enumerate(plan):
            _info(args, f"[{i + 1}/{len(plan)}] {tomo}" if not single else f"reading {tomo}")
            large[0] = _predicted_in_child(tomo)
            bars = _Bars(_stem(tomo), args.quiet)
            try:
                outcome = run_one(tomo, mask, folder, options, get_params, get_model, progress=bars, warn=_warn)
            finally:
                bars.close()
            take(tomo, outcome)

    for tomo in [t for t in tomos if t in records]:  # in the order given (a cluster finishes in any order)
        s = records[tomo]
        t = s["timings_s"]
        removed = ", ".join(f"{n} by {st}" for st, n in s["removed_by_stage"].items())
        thr = f"{s['threshold']:.2f}" if s["threshold"] is not None else "none"
        folder = out if single else out / _stem(tomo)
        print(f"{tomo.name}: {s['n_accepted']} vesicles found, {s['n_removed']} removed"
              + (f" ({removed})" if removed else "") + f"; threshold {thr}; voxel {s['voxel_size_nm']:g} nm")
        print("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
        for w in s["warnings"]:
            print(f"  warning: {w}")
        print(f"  results in {folder}")
    if not single:
        rows = []
        for tomo in tomos:
            if tomo in records:
                r = records[tomo]
                rows.append((tomo.name, "done", r["n_accepted"], times[tomo],
                             f"{len(r['warnings'])} warning(s)" if r["warnings"] else ""))
            elif tomo in skipped:
                rows.append((tomo.name, "skipped", None, None, "finished earlier"))
            else:
                rows.append((tomo.name, "FAILED", None, None, failures.get(tomo, "")))
        print(_summary_table(rows))
        print(f"{len(records)} of {len(tomos)} tomograms segmented, {len(skipped)} skipped, {len(failures)} "
              f"failed in {time.perf_counter() - t_start:.1f} s")
    if failures:
        print(f"cryoves segment: {len(failures)} tomogram(s) failed:", file=sys.stderr)
        for tomo in [t for t in tomos if t in failures]:  # in the order given
            print(f"  {failures[tomo]}", file=sys.stderr)
        return 1
    return 0
