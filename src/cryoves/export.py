"""Export of a segmentation: formats -> files, file names, and results written as one set.

One function writes every output of one tomogram, for the command line and the napari plugin:
:func:`export_results`. :func:`write_format` writes a single format to a single file (napari's
per-layer writers). File names (``docs/outputs.md``):

============ ============================ ==============================================
key          file                         content
============ ============================ ==============================================
``csv``      ``<stem>_vesicles.csv``      the vesicle table (every row and column)
``labels``   ``<stem>_labels.mrc``        accepted vesicles as filled spheres (uint16)
``pyto``     ``<stem>_pyto.mrc``          Pyto labels: region 1, active zone 2, vesicles 10...
``star``     ``<stem>_vesicles.star``     accepted centres for RELION / Warp / Dynamo
``mod``      ``<stem>_vesicles.mod``      IMOD model, one sphere per accepted vesicle
(record)     ``<stem>_segment.json``      the run record, written last
``<key>``    ``<stem>_<key>.mrc``         extra volumes (``probability``, ``labels_global``...)
============ ============================ ==============================================

Results as one set
------------------
Every file is first written into a hidden staging folder beside the outputs
(``.cryoves-staging-<stem>-<pid>-<random>``); only when all are written are they moved into
place, the run record last. The run record lists every file of the set with its size and is
the mark of a complete set: :func:`result_state` calls a set complete only when the record
reads and every file it lists is there with its size. Hence:

- a failure while writing (disk full, file-size limit, an error) removes the staging folder
  and leaves the previous complete set untouched (or nothing);
- a kill while writing leaves only the staging folder, which the next export of any stem in
  that folder removes (its process is gone);
- a kill during the moves (milliseconds) leaves files without their record: an *incomplete*
  set, which :func:`result_state` reports and :func:`export_results` replaces (it never passes
  as finished);
- replacing a complete set needs ``overwrite=True``; files of the old set that the new one
  does not have (another choice of formats) are removed, so sets are never mixed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cryoves import __version__
from cryoves import io as _io
from cryoves._parallel import thread_map
from cryoves.table import VesicleTable, render_labels

__all__ = ["FORMATS", "FORMAT_SUFFIXES", "RECORD_SUFFIX", "output_names", "pyto_regions", "write_format",
           "export_results", "result_state", "ResultState", "remove_stale_staging", "STAGING_PREFIX"]

#: Output formats, in the order they are written.
FORMATS = ("csv", "labels", "pyto", "star", "mod")
#: File-name ending of each format (after the tomogram's stem).
FORMAT_SUFFIXES = {"csv": "_vesicles.csv", "labels": "_labels.mrc", "pyto": "_pyto.mrc",
                   "star": "_vesicles.star", "mod": "_vesicles.mod"}
#: File-name ending of the run record (after the stem).
RECORD_SUFFIX = "_segment.json"
#: Name start of the hidden staging folders.
STAGING_PREFIX = ".cryoves-staging-"
#: Test hook (never set outside tests): ``kill:<key>`` kills this process with SIGKILL right
#: after file ``<key>`` is staged; ``kill-commit:<key>`` right after it is moved into place.
_FAULT_ENV = "CRYOVES_TEST_EXPORT_FAULT"


def output_names(stem: str, formats: Sequence[str] = FORMATS, volumes: Sequence[str] = ()) -> dict[str, str]:
    """File names of a result set: key -> name, the run record (key ``"record"``) last.

    Parameters
    ----------
    stem : str
        Start of every name (the tomogram's name without its ending).
    formats : sequence of str
        Among :data:`FORMATS`.
    volumes : sequence of str
        Keys of extra volumes, written as ``<stem>_<key>.mrc``.
    """
    unknown = [f for f in formats if f not in FORMAT_SUFFIXES]
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose among {', '.join(FORMATS)}")
    names = {f: f"{stem}{FORMAT_SUFFIXES[f]}" for f in formats}
    for key in volumes:
        if key in names or key == "record" or not key.replace("_", "").isalnum():
            raise ValueError(f"invalid extra volume name {key!r}")
        names[key] = f"{stem}_{key}.mrc"
    names["record"] = f"{stem}{RECORD_SUFFIX}"
    return names


def pyto_regions(mask) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Region and active zone for the Pyto file from a region mask.

    Any non-zero voxel is in the region (Pyto value 1). When the mask holds only the values
    0, 1 and 2 and some 2 (a Pyto-style file: 1 = region, 2 = active zone), its 2 voxels are
    the active zone (Pyto value 2).

    Returns
    -------
    region, active_zone : ndarray of bool or None
    """
    if mask is None:
        return None, None
    mask = np.asarray(mask)
    region = mask != 0
    az = None
    if mask.dtype.kind in "iub":
        values = set(np.unique(mask).tolist())
        if 2 in values and values <= {0, 1, 2}:
            az = mask == 2
    return region, az


def _voxel_size(table: VesicleTable | None, voxel_size) -> float:
    vs = getattr(table, "voxel_size", None) if voxel_size is None else voxel_size
    if vs is None:
        raise ValueError("the voxel size is unknown: pass voxel_size= (nm) or use a table that has one")
    from cryoves.validate import check_voxel_size

    return check_voxel_size(vs)


def _need_shape(fmt: str, shape) -> tuple[int, int, int]:
    if shape is None:
        raise ValueError(f"the {fmt} output needs the tomogram's shape (Z, Y, X)")
    return tuple(int(s) for s in shape)


def write_format(fmt: str, path, table: VesicleTable | None, *, shape=None, voxel_size: float | None = None,
                 mask=None, labels=None, tomo_name: str | None = None, overwrite: bool = False) -> Path:
    """Write one format of a vesicle table to one file (atomically, by :mod:`cryoves.io`).

    Parameters
    ----------
    fmt : str
        One of :data:`FORMATS`.
    path : str or Path
    table : VesicleTable or None
        None only for ``labels`` with ``labels`` given (a label volume written as it is).
    shape : (Z, Y, X), optional
        Tomogram shape (needed by ``labels``, ``pyto`` and ``mod``).
    voxel_size : float, optional
        nm (default: the table's).
    mask : ndarray, optional
        Region mask for ``pyto`` (see :func:`pyto_regions`).
    labels : ndarray, optional
        A label volume already rendered (default: rendered from the table): written as it is for
        ``labels``; for ``pyto`` it must be ``render_labels(table, shape)`` (renumbered, not drawn again).
    tomo_name : str, optional
        ``_rlnTomoName`` of the STAR file.
    overwrite : bool

    Returns
    -------
    Path
    """
    path = Path(path)
    if table is None and not (fmt == "labels" and labels is not None):
        raise ValueError(f"the {fmt} output needs a vesicle table")
    if fmt == "csv":
        return _io.write_vesicles_csv(path, table, overwrite=overwrite)
    if fmt == "star":
        return _io.write_star(path, table, tomo_name=tomo_name, overwrite=overwrite)
    if fmt == "mod":  # an IMOD model may be in pixels when the voxel size is unknown
        vs = voxel_size if voxel_size is not None else table.voxel_size
        return _io.write_imod_model(path, table, _need_shape(fmt, shape), vs, overwrite=overwrite)
    vs = _voxel_size(table, voxel_size)
    if fmt == "labels":
        if labels is None:
            labels = render_labels(table, _need_shape(fmt, shape))
        return _io.write_labels_mrc(path, labels, vs, overwrite=overwrite)
    if fmt == "pyto":
        region, az = pyto_regions(mask)
        return _io.write_pyto_labels(path, table, _need_shape(fmt, shape), vs, mask=region, active_zone=az,
                                     overwrite=overwrite, labels=labels)
    raise ValueError(f"unknown format {fmt!r}; choose among {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------
# state of a result set
# ----------------------------------------------------------------------------------------
@dataclass
class ResultState:
    """What :func:`result_state` found for one stem in one folder.

    Attributes
    ----------
    status : str
        ``"complete"`` (run record valid, every file it lists present with its size),
        ``"incomplete"`` (some result files but no valid record, or files missing or of another
        size than the record says) or ``"absent"`` (none of the set's files).
    reason : str
        Why a set is incomplete (empty otherwise).
    record : dict or None
        The run record when it could be read.
    files : list of Path
        Result files present (candidates of the set).
    """

    status: str
    reason: str = ""
    record: dict | None = None
    files: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def covers(self, names: Mapping[str, str]) -> bool:
        """True if the complete set holds every file of ``names`` (from :func:`output_names`)."""
        if not self.complete:
            return False
        have = set((self.record or {}).get("files", {}))
        return all(n in have for k, n in names.items() if k != "record")


def _candidate_files(folder: Path, stem: str, names: Mapping[str, str] | None) -> list[Path]:
    wanted = set(names.values()) if names else set()
    wanted |= {f"{stem}{s}" for s in FORMAT_SUFFIXES.values()} | {f"{stem}{RECORD_SUFFIX}"}
    found = [folder / n for n in sorted(wanted) if os.path.lexists(folder / n)]
    prefix = f"{stem}_"
    try:  # extra volumes of an earlier run: <stem>_<key>.mrc listed by its record, or any such file
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix) and entry.name.endswith(".mrc") and folder / entry.name not in found:
                key = entry.name[len(prefix):-4]
                if key in ("probability",) or key.startswith("labels_"):
                    found.append(folder / entry.name)
    except OSError:
        pass
    return found


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def result_state(folder, stem: str, names: Mapping[str, str] | None = None) -> ResultState:
    """Is there a complete result set for ``stem`` in ``folder``?

    Parameters
    ----------
    folder : path
    stem : str
    names : mapping, optional
        The set's file names (:func:`output_names`); default: the standard names.

    Returns
    -------
    ResultState
    """
    folder = Path(folder)
    files = _candidate_files(folder, stem, names) if folder.is_dir() else []
    if not files:
        return ResultState("absent")
    record_path = folder / f"{stem}{RECORD_SUFFIX}"
    if not record_path.exists():
        return ResultState("incomplete", f"no run record {record_path.name} (an interrupted run?)", None, files)
    rec = _read_record(record_path)
    if rec is None or not isinstance(rec.get("files"), dict) or not rec.get("complete"):
        return ResultState("incomplete", f"the run record {record_path.name} is unreadable or from an "
                                         f"incomplete run", rec, files)
    for name, size in rec["files"].items():
        p = folder / name
        if not p.is_file():
            return ResultState("incomplete", f"{name} listed in {record_path.name} is missing", rec, files)
        if p.stat().st_size != size:
            return ResultState("incomplete", f"{name} has {p.stat().st_size} bytes, the run record says {size}",
                               rec, files)
    return ResultState("complete", "", rec, files)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder) -> list[Path]:
    """Remove staging folders left in ``folder`` by killed runs (their process is gone).

    Also removes hidden ``.NAME.xxxx.part`` files of :func:`cryoves.io.atomic_path` older than
    an hour (a killed writer). Returns what was removed.
    """
    import time

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
            parts = name[len(STAGING_PREFIX):].rsplit("-", 2)
            try:
                pid = int(parts[-2])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        elif name.startswith(".") and name.endswith(".part") and entry.is_file(follow_symlinks=False):
            try:
                if time.time() - entry.stat().st_mtime > 3600:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _write_error(err: OSError, target: Path, state: ResultState) -> OSError:
    """A one-line error naming the file that could not be written and what was kept."""
    why = err.strerror or str(err)
    extra = {27: " (a file-size limit is set: see 'ulimit -f')", 28: " (the disk is full)",
             122: " (the disk quota is exceeded)"}.get(err.errno or 0, "")
    kept = ("the previous results are unchanged" if state.complete
            else "no result was written" if state.status == "absent" else "nothing else was changed")
    return type(err)(err.errno, f"cannot write {target}: {why}{extra}; {kept}")


def _fault(stage: str, key: str) -> None:
    spec = os.environ.get(_FAULT_ENV)
    if spec and spec == f"{stage}:{key}":
        os.kill(os.getpid(), signal.SIGKILL)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def export_results(folder, stem: str, table: VesicleTable, *, shape=None, voxel_size: float | None = None,
                   formats: Sequence[str] = FORMATS, mask=None, labels=None,
                   volumes: Mapping[str, np.ndarray] | None = None, record=None,
                   overwrite: bool = False, progress=None) -> dict[str, Path]:
    """Write a segmentation's outputs as one set (see the module docstring).

    Parameters
    ----------
    folder : str or Path
        Output folder (created if missing).
    stem : str
        Start of every file name (usually the tomogram's name without its ending).
    table : VesicleTable
        Every vesicle (removed rows included; only accepted ones go into labels, Pyto, STAR,
        IMOD).
    shape : (Z, Y, X), optional
        Tomogram shape; needed by ``labels``, ``pyto`` and ``mod``.
    voxel_size : float, optional
        nm (default: the table's).
    formats : sequence of str
        Among :data:`FORMATS` (default: all).
    mask : ndarray, optional
        Region mask: Pyto region (and active zone, see :func:`pyto_regions`).
    labels : ndarray, optional
        The accepted vesicles already rendered, ``render_labels(table, shape)`` (e.g.
        ``SegmentationResult.labels``): written as the labels file and renumbered for Pyto.
    volumes : mapping of str to ndarray, optional
        Extra volumes, each written as ``<stem>_<key>.mrc`` (float32 or label MRC).
    record : mapping or callable, optional
        Content of the run record (``<stem>_segment.json``), or a function returning it, called
        once every other file is written (so it can include the time taken); ``cryoves_version``,
        ``voxel_size_nm``, ``n_accepted``, ``outputs`` (key -> name), ``files`` (name -> bytes)
        and ``complete`` are added.
    overwrite : bool
        Replace a complete earlier set. An incomplete one (see :func:`result_state`) is always
        replaced; files of another tool with the same names count as an incomplete set.
    progress : callable, optional
        ``progress("export", done, total)``.

    Returns
    -------
    dict of str to Path
        key -> written file, ``"record"`` last.

    Raises
    ------
    FileExistsError
        A complete set exists and ``overwrite`` is False (nothing is written).
    PermissionError
        A file of the set would replace a protected input file.
    OSError, ValueError
        Writing failed (the previous set is left as it was).
    """
    folder = Path(folder)
    formats = tuple(dict.fromkeys(formats))
    volumes = dict(volumes or {})
    names = output_names(stem, formats, tuple(volumes))
    vs = _voxel_size(table, voxel_size)
    for f in formats:
        if f in ("labels", "pyto", "mod"):
            shape = _need_shape(f, shape if shape is not None else (None if labels is None else labels.shape))
    targets = {k: folder / n for k, n in names.items()}
    for p in targets.values():
        if _io.is_protected(p):
            raise PermissionError(f"refusing to write {p}: it is an input file of this run (cryoves never "
                                  f"replaces its inputs); choose another output folder")
    _io.check_output_dir(folder)
    remove_stale_staging(folder)
    state = result_state(folder, stem, names)
    if state.complete and not overwrite:
        raise FileExistsError(f"results for {stem} already exist in {folder} "
                              f"({', '.join(p.name for p in state.files)}); pass overwrite=True "
                              f"(command line: --overwrite) to replace them")

    for old in state.files:  # files of an earlier set that this one would remove
        if _io.is_protected(old):
            raise PermissionError(f"refusing to replace the results in {folder}: {old.name} is an input file of "
                                  f"this run (cryoves never removes its inputs); choose another output folder")
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f"{STAGING_PREFIX}{stem}-{os.getpid()}-"))
    total = len(names)
    try:
        staged: dict[str, Path] = {}
        def write_one(item):
            key, p = item
            try:
                if key in FORMAT_SUFFIXES:
                    write_format(key, p, table, shape=shape, voxel_size=vs, mask=mask, labels=labels,
                                 tomo_name=stem)
                else:
                    vol = np.asarray(volumes[key])
                    if vol.dtype.kind in "iub":
                        _io.write_labels_mrc(p, vol, vs, label=f"cryoves {__version__} {key}")
                    else:
                        _io.write_mrc(p, vol.astype(np.float32, copy=False), vs,
                                      label=f"cryoves {__version__} {key}")
            except OSError as err:
                return err
            return None

        items = [(key, staging / name) for key, name in names.items() if key != "record"]
        # the files on the process's cores: most of writing a label volume is the kernel's work
        # of filling the page cache, and two of them (labels, Pyto) are written side by side
        results = thread_map(write_one, items, min_items=2)
        try:
            for i, ((key, p), err) in enumerate(zip(items, results)):
                if progress is not None:
                    progress("export", i, total)
                if err is not None:
                    raise _write_error(err, targets[key], state) from None
                staged[key] = p
                _fault("kill", key)
        finally:
            results.close()  # on an error: every writer has stopped before the staging is removed
        rec = dict((record() if callable(record) else record) or {})
        rec.setdefault("cryoves_version", __version__)
        rec.setdefault("voxel_size_nm", vs)
        rec.setdefault("n_accepted", len(table.accepted()))
        rec["outputs"] = {k: n for k, n in names.items() if k != "record"}
        rec["files"] = {p.name: p.stat().st_size for p in staged.values()}
        rec["complete"] = True
        _io.atomic_write_text(staging / names["record"], json.dumps(_jsonable(rec), indent=2) + "\n")
        staged["record"] = staging / names["record"]

        # commit: the old record goes first (from here on the old set is no longer "complete"),
        # then every new file, files of the old set that the new one lacks, the new record last.
        old_record = folder / names["record"]
        if os.path.lexists(old_record):
            os.unlink(old_record)
        for key, p in staged.items():
            if key == "record":
                continue
            os.replace(p, targets[key])
            _fault("kill-commit", key)
        for old in state.files:
            if old.name not in {n for n in names.values()} and os.path.lexists(old):
                os.unlink(old)
        os.replace(staged["record"], targets["record"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress("export", total, total)
    return targets
