"""Segment many tomograms: the one per-tomogram function, run here or on a dask cluster.

:func:`segment_one` reads, segments, checks and writes one tomogram (its files written as one
set by :func:`cryoves.export.export_results`) and returns its run record. ``cryoves segment``
runs it for each tomogram in its own process, or, with ``--workers N`` / ``--scheduler
ADDRESS``, on the workers of a ``dask.distributed`` cluster through :func:`run_on_cluster`:
one task per tomogram, one model per worker process (loaded once, by
:func:`cryoves.model.get_model`), the same function in both cases.

What a cluster adds, and how it is handled:

- a task whose worker dies (killed, out of memory) is run again by the scheduler on another
  worker (``distributed.scheduler.allowed-failures``, 3 by default); a set half written by the
  dead worker is left staged (removed by the next export into that folder) or *incomplete*
  (no run record), which :func:`cryoves.export.export_results` replaces;
- a task that raises an unexpected error is retried once (``retries=1``); the usual errors of a
  tomogram (bad data, a write failure) are not retried: they are that tomogram's result;
- an error that concerns the whole run (weights that do not load) stops the run.

dask is imported only by :func:`run_on_cluster` (``pip install "cryoves[dask]"``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["RunOptions", "RunError", "stem_of", "load_model_checked", "check_weights", "segment_one", "run_one",
           "run_on_cluster", "INTERMEDIATES", "DASK_MISSING"]

#: Extra volumes written with ``save_intermediates``.
INTERMEDIATES = ("probability", "labels_global", "labels_adaptive", "labels_refine", "labels_outliers")
_MRC_ENDINGS = (".mrc.gz", ".rec.gz", ".map.gz", ".mrc.bz2", ".rec.bz2", ".map.bz2",
                ".mrc", ".rec", ".map", ".mrcs", ".st", ".ali")
#: The one-line message when dask is needed but missing.
DASK_MISSING = 'dask.distributed is not installed; install it with: pip install "cryoves[dask]"'
#: Test hook (never set outside tests): ``STEM:MARKER`` makes the dask worker that runs tomogram
#: ``STEM`` kill itself (SIGKILL) right after the first file of its set is moved into place, the
#: first time only (``MARKER`` is created then), leaving an incomplete set behind.
_TEST_KILL_ENV = "CRYOVES_TEST_BATCH_KILL"


@dataclass(frozen=True)
class RunOptions:
    """The options of a segmentation run that are the same for every tomogram.

    Attributes
    ----------
    voxel_size : float or None
        nm; None: from each header.
    invert : bool
        Negate the tomogram before every stage (dense = bright data).
    formats : tuple of str
        Among :data:`cryoves.export.FORMATS`.
    save_intermediates : bool
        Also write the probability map and each stage's labels.
    weights : str or None
        U-Net weights (None: the default weights).
    """

    voxel_size: Optional[float] = None
    invert: bool = False
    formats: tuple = ("csv", "labels", "pyto", "star", "mod")
    save_intermediates: bool = False
    weights: Optional[str] = None


class RunError(Exception):
    """An error that concerns the whole run (the weights), not one tomogram: the run stops."""


def stem_of(path) -> str:
    """A tomogram's name without its ending (``tomo.mrc.gz`` -> ``tomo``): the start of its outputs."""
    name = Path(path).name
    for ending in _MRC_ENDINGS:
        if name.lower().endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return Path(path).stem or name


def load_model_checked(weights, cached: bool = False):
    """Load the U-Net of ``weights`` (None: the default), errors as one :class:`RunError` line.

    Parameters
    ----------
    weights : str or Path or None
    cached : bool
        Use :func:`cryoves.model.get_model` (one model per process, shared) instead of
        :func:`cryoves.model.load_model`.
    """
    from cryoves.model import get_model, load_model

    try:
        return (get_model if cached else load_model)(weights)
    except FileNotFoundError as err:
        raise _no_weights(weights, err) from None
    except (ValueError, OSError) as err:
        # load_model words its errors in one line naming the file; keep that line
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise RunError(f"--weights: {first}") from None


def check_weights(weights) -> None:
    """Raise :class:`RunError` when ``weights`` (None: the default) names no weights file (nothing loaded)."""
    from cryoves.model import resolve_weights

    try:
        resolve_weights(weights)
    except FileNotFoundError as err:
        raise _no_weights(weights, err) from None


def _no_weights(weights, err) -> RunError:
    """The one-line error for weights that are not found."""
    if weights is None:
        return RunError(f"no default U-Net weights ship with this installation ({err}). Pass weights with "
                        f"--weights PATH: cryoves NAME.weights.h5 (its NAME.json card next to it) or the "
                        f"reference CryoVesNet weights.h5")
    return RunError(f"--weights: {err}")


def _workdir(folder: Path) -> Optional[str]:
    """The output folder, for a child process's temporary files (None: the system's temporary folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder)


def segment_one(tomo_path, mask_path, folder, options: RunOptions, get_params: Callable, get_model: Callable,
                progress=None, warn: Optional[Callable[[str], None]] = None) -> dict:
    """Read, segment, check and write one tomogram; returns its run record.

    The tomogram is read (and its values checked) before ``get_params`` and ``get_model`` are
    called, so that bad data are reported before the pipeline and the model are loaded.

    Parameters
    ----------
    tomo_path, mask_path : Path (mask_path may be None)
    folder : Path
        Output folder of this tomogram's set.
    options : RunOptions
    get_params : callable
        Returns the :class:`cryoves.pipeline.SegmentParams`.
    get_model : callable
        Returns the :class:`cryoves.model.UNetModel`.
    progress : callable, optional
        ``progress(stage, done, total)`` for the pipeline.
    warn : callable, optional
        Called with each warning about this tomogram (they are in the record's ``warnings`` too).

    Returns
    -------
    dict
        The run record written as ``<stem>_segment.json``.

    Raises
    ------
    ValueError, OSError, TypeError
        Bad data or a failed write (this tomogram's error).
    """
    from cryoves import __version__
    from cryoves import io as cio
    from cryoves._memory import kept_freed_memory
    from cryoves._tf import compute_device
    from cryoves.export import export_results
    from cryoves.model import inference_precision

    tomo_path = Path(tomo_path)
    folder = Path(folder)
    stem = stem_of(tomo_path)
    timings = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tomogram, vs = cio.read_tomogram(tomo_path, options.voxel_size)
    notes += [str(w.message) for w in caught]
    mask = None
    if mask_path is not None:
        mask, mask_vs = cio.read_labels(mask_path, check_shape=tomogram.shape)
        if mask_vs is not None and abs(mask_vs - vs) > 0.01 * vs:
            notes.append(f"{Path(mask_path).name}: header voxel size {mask_vs:g} nm differs from the "
                         f"tomogram's {vs:g} nm")
    timings["read"] = time.perf_counter() - t0
    params = get_params()
    from cryoves.pipeline import CHILD_PROCESS_VOXELS, segment

    # a large tomogram: the network runs in a child process (its memory returned before the
    # post-processing; cryoves.pipeline.predict_in_child), so it is not loaded here
    in_child = math.prod(tomogram.shape) >= CHILD_PROCESS_VOXELS
    # a tomogram predicted here: its stages reuse the memory the stages before them freed
    # (cryoves._memory; fresh pages are costly in a virtual machine); a large one keeps glibc's
    # defaults, for its memory bound
    with kept_freed_memory(not in_child):
        if in_child:
            check_weights(options.weights)
            model = options.weights
        else:
            model = get_model()

        if options.invert:
            import numpy as np

            tomogram = np.negative(tomogram, dtype=np.float32)  # a new array: the input stays as it is

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = segment(tomogram, vs, model, params=params, mask=mask,
                             keep_intermediates=options.save_intermediates, progress=progress,
                             prediction_process="child" if in_child else "main", workdir=_workdir(folder))
        for w in caught:
            msg = str(w.message)
            if issubclass(w.category, UserWarning) and msg not in notes:
                notes.append(msg)
        if options.invert:
            from cryoves.validate import INVERT_HINT

            notes = [n.replace(INVERT_HINT, "this run used --invert: try without it") for n in notes]
        timings.update({k: v for k, v in result.timings.items() if k != "total"})
        if warn is not None:
            for n in notes:
                warn(f"{tomo_path.name}: {n}")

        t0 = time.perf_counter()
        table, shape = result.table, tuple(tomogram.shape)
        volumes = {}
        if options.save_intermediates:
            volumes["probability"] = result.probability
            for s, vol in result.stage_labels.items():
                volumes[f"labels_{s}"] = vol
        record = {
            "cryoves_version": __version__,
            "tomogram": str(tomo_path.resolve()),
            "mask": None if mask_path is None else str(Path(mask_path).resolve()),
            "shape": list(shape),
            "voxel_size_nm": vs,
            "inverted": bool(options.invert),
            "weights": (result.prediction["weights"] if in_child else
                        None if model is None else str(getattr(model, "path", None) or getattr(model.card, "name", ""))),
            "device": result.prediction["device"] if in_child else compute_device(),  # where the U-Net ran
            "precision": (result.prediction["precision"] if in_child
                          else None if model is None else inference_precision()),  # its arithmetic
            "threshold": result.threshold if result.threshold == result.threshold else None,
            "n_accepted": result.n_accepted,
            "n_removed": result.n_removed,
            "removed_by_stage": result.removed_by_stage(),
            "warnings": notes,
            "params": params.to_dict(),
        }

        def final_record():  # called by export_results once every other file is written
            timings["write"] = time.perf_counter() - t0
            record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            return record

        export_results(folder, stem, table, shape=shape, voxel_size=vs, formats=options.formats, mask=mask,
                       labels=result.labels, volumes=volumes, record=final_record, overwrite=True)
        return record


def run_one(tomo_path, mask_path, folder, options: RunOptions, get_params: Callable, get_model: Callable,
            progress=None, warn=None) -> dict:
    """:func:`segment_one` with its outcome as a dict (the unit of work of a batch).

    Returns
    -------
    dict
        ``{"status": "done", "record": ..., "seconds": ...}`` or ``{"status": "failed",
        "error": message}`` for this tomogram's errors (ValueError, OSError, TypeError).
        :class:`RunError` and other exceptions propagate.
    """
    t0 = time.perf_counter()
    try:
        record = segment_one(tomo_path, mask_path, folder, options, get_params, get_model, progress, warn)
    except (ValueError, OSError, TypeError) as err:
        return {"status": "failed", "error": str(err)}
    return {"status": "done", "record": record, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------
# dask
# ----------------------------------------------------------------------------------------
def _test_kill_hook(stem: str, options: RunOptions) -> None:
    spec = os.environ.get(_TEST_KILL_ENV)
    if not spec or ":" not in spec:
        return
    target, marker = spec.split(":", 1)
    if target != stem or os.path.exists(marker):
        return
    Path(marker).write_text(f"{os.getpid()}\n")
    from cryoves.export import _FAULT_ENV

    os.environ[_FAULT_ENV] = f"kill-commit:{options.formats[0]}"  # export_results SIGKILLs this process


def _cluster_task(tomo_path: str, mask_path: Optional[str], folder: str, options: RunOptions, params) -> dict:
    """One tomogram on a dask worker: :func:`run_one` with this worker's model (loaded once)."""
    from cryoves import io as cio

    from cryoves import _workers

    cio.protect_path(tomo_path)  # inputs are never written to, in this process too
    if mask_path is not None:
        cio.protect_path(mask_path)
    _workers.set_enabled(False)  # the cluster's workers are the processes: no helpers of their own
    _test_kill_hook(stem_of(tomo_path), options)
    try:
        return run_one(tomo_path, mask_path, folder, options, lambda: params,
                       lambda: load_model_checked(options.weights, cached=True))
    except RunError as err:
        return {"status": "abort", "error": str(err)}


def run_on_cluster(plan: Sequence[tuple], options: RunOptions, params, *, workers: Optional[int] = None,
                   scheduler: Optional[str] = None, on_result: Optional[Callable] = None,
                   info: Optional[Callable[[str], None]] = None) -> dict:
    """Run :func:`run_one` for each tomogram of ``plan`` on a dask cluster.

    Parameters
    ----------
    plan : sequence of (tomo_path, mask_path, folder)
        Paths must be readable and writable from every worker (a shared file system).
    options : RunOptions
    params : SegmentParams
    workers : int, optional
        Start a ``dask.distributed.LocalCluster`` of this many single-threaded worker processes
        on 127.0.0.1 (closed at the end).
    scheduler : str, optional
        Address of a running dask scheduler (``tcp://HOST:8786``); its cluster is left running.
    on_result : callable, optional
        ``on_result(tomo_path, outcome)`` as each tomogram finishes (in completion order).
    info : callable, optional
        Progress messages.

    Returns
    -------
    dict
        tomo_path -> outcome (:func:`run_one`'s dict; an error of the cluster, e.g. a tomogram
        whose workers kept dying, is a ``"failed"`` outcome).

    Raises
    ------
    ImportError
        dask.distributed is not installed (message :data:`DASK_MISSING`).
    RunError
        The weights do not load (on a worker), or the scheduler cannot be reached.
    """
    if (workers is None) == (scheduler is None):
        raise ValueError("give exactly one of workers= and scheduler=")
    try:
        import logging

        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError(DASK_MISSING) from None

    import dataclasses

    if options.weights is not None:  # workers may run elsewhere, in another folder
        options = dataclasses.replace(options, weights=str(Path(options.weights).resolve()))
    say = info or (lambda msg: None)
    cluster = None
    outcomes: dict = {}
    try:
        if workers is not None:
            if int(workers) < 1:
                raise ValueError(f"--workers must be at least 1, got {workers}")
            say(f"starting a local dask cluster of {workers} worker process(es)")
            # single-threaded workers on loopback only; no memory limit (a worker paused or
            # restarted by dask's memory manager in the middle of a prediction helps nobody)
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None, memory_limit=0,
                                   silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as err:
                raise RunError(f"--scheduler: cannot connect to the dask scheduler at {scheduler}: {err}") from None
        try:
            futures = {}
            for tomo, mask, folder in plan:
                fut = client.submit(_cluster_task, str(Path(tomo).resolve()),
                                    None if mask is None else str(Path(mask).resolve()),
                                    str(Path(folder).resolve()), options, params,
                                    key=f"cryoves-segment-{stem_of(tomo)}-{os.urandom(4).hex()}",
                                    pure=False, retries=1)
                futures[fut] = tomo
            for fut in as_completed(list(futures)):
                tomo = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as err:  # noqa: BLE001 - the cluster's error is this tomogram's
                    name = type(err).__name__
                    if name == "KilledWorker":
                        msg = "its dask worker died each time it ran (out of memory? see the worker logs)"
                    else:
                        msg = f"failed on the dask cluster: {name}: {err}"
                    outcome = {"status": "failed", "error": msg}
                if outcome["status"] == "abort":
                    for f in futures:
                        f.cancel()
                    raise RunError(outcome["error"])
                outcomes[tomo] = outcome
                if on_result is not None:
                    on_result(tomo, outcome)
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
    return outcomes
