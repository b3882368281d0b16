"""All file input and output of cryoves.

Reading
-------
:func:`read_tomogram` reads an MRC/CCP4 volume (``.mrc``, ``.rec``, ``.map``, ``.mrcs``,
``.st``..., also gzip/bzip2-compressed ``.mrc.gz``/``.mrc.bz2``) and returns a float32
(Z, Y, X) array and the voxel size in nm. It validates everything a segmentation depends
on and says what to do when something is wrong: a file that is not MRC or is truncated,
2-D or 4-D data, NaN/Inf voxels, a constant volume, a missing or implausible voxel size in
the header (pass ``voxel_size=`` / ``--voxel-size``), anisotropic voxels.
Uncompressed float32 files are returned as a read-only memory map (nothing is loaded until
used); other modes are converted to float32 slab by slab, so the peak memory is the float32
result plus one slab.

Every file read by :func:`read_tomogram` is remembered (device and inode) for the rest of
the process: no writer of this module will replace it, even with ``overwrite=True``
(:func:`protect_path` adds more files, e.g. a region mask given on the command line).

Writing
-------
Every writer is atomic (the file is written to a hidden temporary file in the destination
folder and moved into place with :func:`os.replace`, so a crash never leaves a half-written
result), refuses to replace an existing file unless ``overwrite=True``
(:class:`FileExistsError`), and never replaces a protected input file. A write failure (disk
full, file-size limit) is reported with the file's name. :func:`atomic_path`,
:func:`atomic_write_bytes` and :func:`atomic_write_text` give the same guarantees to any other
file cryoves writes (run records, model cards, simulation parameters).

- :func:`write_mrc`: any volume (float32, float16, int8, int16, uint16), voxel size in Å
- :func:`write_labels_mrc`: label volume as uint16 (MRC mode 6)
- :func:`write_pyto_labels`: Pyto convention: region 1, active zone 2, vesicles 10, 11, ...
- :func:`write_vesicles_csv` / :func:`read_vesicles_csv`: every table column, exact round trip
- :func:`write_star` / :func:`read_star`: RELION-style STAR (``data_particles``), pixel coordinates
- :func:`write_imod_model` / :func:`read_imod_model`: IMOD binary model, scattered points + sizes

See ``docs/outputs.md`` for the formats and how to open them in IMOD, Pyto, RELION and Warp.
"""

from __future__ import annotations

import csv
import functools
import math
import mmap
import os
import shlex
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cryoves import __version__
from cryoves.table import COLUMNS, VesicleTable, check_voxel_size, render_labels
from cryoves.validate import VOXEL_SIZE_RANGE_NM, check_finite
from cryoves.validate import check_voxel_size as _check_voxel_size_range

__all__ = [
    "read_tomogram", "read_labels", "read_mrc_header", "voxel_size_from_header", "MrcInfo",
    "write_mrc", "write_labels_mrc", "write_pyto_labels",
    "write_vesicles_csv", "read_vesicles_csv", "vesicles_csv_text",
    "write_star", "read_star",
    "write_imod_model", "read_imod_model",
    "protect_path", "is_protected", "check_output_dir", "release_pages",
    "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "VOXEL_SIZE_RANGE_NM", "MRC_SUFFIXES",
]

# VOXEL_SIZE_RANGE_NM (plausible voxel sizes, nm; outside it a header value is rejected) is
# defined in cryoves.validate and re-exported here.
#: File name endings recognised as MRC/CCP4 (content decides; this is for messages and globbing).
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".mrcs", ".st", ".ali", ".mrc.gz", ".rec.gz", ".map.gz",
                ".mrc.bz2", ".rec.bz2", ".map.bz2")

_HEADER_BYTES = 1024
_SLAB_BYTES = 64 * 2 ** 20          # float32 bytes converted / checked at a time
_IMOD_STAMP = 1146047817           # 'IMOD' stamp at byte 152 of an MRC header written by IMOD
_ANISOTROPY_TOL = 0.01


# ----------------------------------------------------------------------------------------
# protection of input files
# ----------------------------------------------------------------------------------------
_PROTECTED: set[tuple[int, int]] = set()


def _file_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def protect_path(path) -> None:
    """Never let a writer of this module replace ``path`` (same device and inode) in this process.

    :func:`read_tomogram` calls it for every file it reads. Hard links and symbolic links to
    the same file are protected too.
    """
    key = _file_key(path)
    if key is not None:
        _PROTECTED.add(key)


def is_protected(path) -> bool:
    """True if ``path`` is (a link to) a file protected by :func:`protect_path`."""
    key = _file_key(path)
    return key is not None and key in _PROTECTED


# ----------------------------------------------------------------------------------------
# reading MRC
# ----------------------------------------------------------------------------------------
class MrcInfo:
    """What the header of an MRC file says (see :func:`read_mrc_header`).

    Attributes
    ----------
    path : Path
    shape : tuple of int
        Shape of the data as mrcfile interprets it (2-D image, 3-D volume/stack, 4-D stack of
        volumes), in file axis order.
    dtype : numpy.dtype
        Data type of the voxels in the file (byte order included).
    mode : int
        MRC mode number.
    voxel_size_A : tuple of float
        (X, Y, Z) voxel size in Å as the header gives it (cell size / sampling; 0 if unset).
    axis_order : tuple of int
        (mapc, mapr, maps): which axis (1 = X, 2 = Y, 3 = Z) the columns, rows and sections are.
    ispg : int
        Space group (0 = image stack, 1 = volume, 401 = stack of volumes).
    compressed : str or None
        ``"gzip"``, ``"bzip2"`` or None.
    data_offset : int
        Byte offset of the data block (1024 + extended header).
    """

    __slots__ = ("path", "shape", "dtype", "mode", "voxel_size_A", "axis_order", "ispg",
                 "compressed", "data_offset", "file_size", "warnings")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def __repr__(self) -> str:
        return (f"MrcInfo({self.path.name}: shape={self.shape}, dtype={self.dtype}, mode={self.mode}, "
                f"voxel_size_A={self.voxel_size_A}, compressed={self.compressed})")


def _not_mrc_message(path: Path, detail: str) -> str:
    return (f"{path} is not a readable MRC file ({detail}). cryoves reads MRC/CCP4 volumes "
            f"(.mrc, .rec, .map, .mrcs, optionally .gz/.bz2 compressed); convert other formats "
            f"first, e.g. with IMOD's tif2mrc or 'python -m mrcfile'.")


def _as_path(path, func: str) -> Path:
    """``path`` as a Path, or a TypeError saying that ``func`` wants a file name."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    what = (f"a {type(path).__module__.split('.')[0]} array" if hasattr(path, "shape")
            else f"a {type(path).__name__}")
    hint = (" To segment an array in memory, pass it to cryoves.segment(array, voxel_size) directly."
            if hasattr(path, "shape") else "")
    raise TypeError(f"{func}() wants the path of an MRC file, got {what}.{hint}")


def read_mrc_header(path) -> MrcInfo:
    """Read and validate the header of an MRC file, without reading its data.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    MrcInfo

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist. ``IsADirectoryError`` if it is a folder.
    ValueError
        If the file is not MRC, its mode is not supported, or it is shorter than its header
        says (truncated).
    """
    import mrcfile
    from mrcfile.bzip2mrcfile import Bzip2MrcFile
    from mrcfile.gzipmrcfile import GzipMrcFile
    from mrcfile import utils as mrc_utils

    path = _as_path(path, "read_mrc_header")
    if not path.exists():
        raise FileNotFoundError(f"tomogram file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an MRC file")
    file_size = path.stat().st_size
    if file_size == 0:
        raise ValueError(_not_mrc_message(path, "the file is empty"))
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.open(path, mode="r", permissive=False, header_only=True)
    except (ValueError, EOFError, OSError) as err:
        # Old MRC files (before MRC2000) have no 'MAP ' id, and some programs write a zero
        # machine stamp; accept such a file only if everything else in the header is
        # consistent and the file has exactly the size it implies.
        mrc = None
        strict_error = err
        if "Map ID" in str(err) or "machine stamp" in str(err):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mrc = mrcfile.open(path, mode="r", permissive=True, header_only=True)
                dtype = mrc_utils.data_dtype_from_header(mrc.header)
                shape = mrc_utils.data_shape_from_header(mrc.header)
                expected = _HEADER_BYTES + int(mrc.header.nsymbt) + int(np.prod(shape)) * dtype.itemsize
                if isinstance(mrc, (GzipMrcFile, Bzip2MrcFile)) or expected != file_size or min(shape) < 1:
                    raise ValueError("inconsistent")
                what = ("has no 'MAP ' id (pre-2000 MRC format?)" if "Map ID" in str(err)
                        else "has an invalid machine stamp (byte order); little-endian assumed")
                notes.append(f"{path.name}: the header {what}; read anyway because the file size "
                             f"matches the header exactly")
            except Exception:
                if mrc is not None:
                    mrc.close()
                mrc = None
        if mrc is None:
            msg = str(strict_error)
            if "Couldn't read enough bytes" in msg:
                msg = f"the file has {file_size} bytes, shorter than an MRC header (1024 bytes)"
            raise ValueError(_not_mrc_message(path, msg)) from None
    try:
        header = mrc.header
        compressed = ("gzip" if isinstance(mrc, GzipMrcFile)
                      else "bzip2" if isinstance(mrc, Bzip2MrcFile) else None)
        mode = int(header.mode)
        try:
            dtype = mrc_utils.data_dtype_from_header(header)
        except ValueError:
            raise ValueError(f"{path}: MRC mode {mode} is not supported (cryoves reads modes 0, 1, 2, "
                             f"6 and 12: 8/16-bit integers, float16 and float32). Convert it, e.g. "
                             f"with IMOD's 'newstack -mode 2'.") from None
        if dtype.kind == "c":
            raise ValueError(f"{path}: MRC mode {mode} holds complex numbers (a Fourier transform?), "
                             f"not a tomogram")
        if mode == 0:
            raw = np.asarray(header).tobytes()
            for bo in "<>":
                stamp, flags = struct.unpack(bo + "ii", raw[152:160])
                if stamp == _IMOD_STAMP:
                    if flags & 1:
                        dtype = np.dtype(np.uint8)  # IMOD's flag for unsigned bytes in mode 0
                    break
        shape = tuple(int(s) for s in mrc_utils.data_shape_from_header(header))
        mx, my, mz = int(header.mx), int(header.my), int(header.mz)
        cella = header.cella
        vs = tuple(float(c) / m if m else 0.0 for c, m in zip((cella.x, cella.y, cella.z), (mx, my, mz)))
        offset = _HEADER_BYTES + int(header.nsymbt)
        info = MrcInfo(path=path, shape=shape, dtype=dtype, mode=mode, voxel_size_A=vs,
                       axis_order=(int(header.mapc), int(header.mapr), int(header.maps)),
                       ispg=int(header.ispg), compressed=compressed, data_offset=offset,
                       file_size=file_size, warnings=notes)
    finally:
        mrc.close()
    if any(s < 1 for s in shape):
        raise ValueError(f"{path}: the header gives dimensions {shape}: the file holds no data")
    if compressed is None:
        expected = offset + int(np.prod(shape)) * info.dtype.itemsize
        if file_size < expected:
            raise ValueError(
                f"{path} is truncated: its header promises {expected} bytes "
                f"(shape {shape}, {info.dtype.name}) but the file has only {file_size}. "
                f"It was probably not copied or written completely; copy it again.")
    return info


def _voxel_size_from_header(info: MrcInfo, voxel_size, path: Path) -> float:
    """Resolve the voxel size (nm) from the header and an optional explicit value."""
    lo, hi = VOXEL_SIZE_RANGE_NM
    hx, hy, hz = (v / 10.0 for v in info.voxel_size_A)
    header_desc = f"X={hx * 10:g} Å, Y={hy * 10:g} Å, Z={hz * 10:g} Å"
    if voxel_size is not None:
        vs = _check_voxel_size_range(voxel_size, name="voxel_size")
        header_vals = [h for h in (hx, hy, hz) if lo <= h <= hi]
        if header_vals and any(abs(h - vs) > _ANISOTROPY_TOL * vs for h in header_vals):
            warnings.warn(f"{path.name}: using voxel_size={vs:g} nm although the header says "
                          f"{header_desc}", UserWarning, stacklevel=3)
        return vs
    fix = "Pass the voxel size in nm explicitly: voxel_size= (Python) or --voxel-size (command line)."
    if not all(np.isfinite(h) and h > 0 for h in (hx, hy, hz)):
        raise ValueError(f"{path}: the MRC header has no voxel size ({header_desc}). {fix}")
    if max(hx, hy, hz) - min(hx, hy, hz) > _ANISOTROPY_TOL * min(hx, hy, hz):
        raise ValueError(
            f"{path}: the header gives anisotropic voxels ({header_desc}). cryoves needs isotropic "
            f"voxels (spheres are fitted in voxel units). A tomogram reconstructed from a tilt series "
            f"has equal X, Y and Z voxel sizes, so the header is probably wrong: {fix} If the volume "
            f"really is anisotropic, resample it to isotropic voxels first.")
    vs = float(np.mean([hx, hy, hz]))
    if not lo <= vs <= hi:
        raise ValueError(f"{path}: the header voxel size {vs * 10:g} Å = {vs:g} nm is implausible for a "
                         f"cryo-electron tomogram (expected {lo}-{hi} nm; the header is probably unset "
                         f"or wrong). {fix}")
    return vs


def voxel_size_from_header(info: "MrcInfo | str | os.PathLike", voxel_size: float | None = None) -> float:
    """The voxel size (nm) :func:`read_tomogram` would use, from a header alone.

    Parameters
    ----------
    info : MrcInfo or path
        A header from :func:`read_mrc_header`, or a file to read it from.
    voxel_size : float, optional
        An explicit value (nm), validated and preferred as in :func:`read_tomogram`.

    Raises
    ------
    ValueError
        Missing, implausible or anisotropic header voxel size without ``voxel_size``.
    """
    if not isinstance(info, MrcInfo):
        info = read_mrc_header(info)
    return _voxel_size_from_header(info, voxel_size, info.path)


def _zyx_view(data: np.ndarray, axis_order, path: Path) -> np.ndarray:
    if tuple(axis_order) == (1, 2, 3):
        return data
    if sorted(axis_order) != [1, 2, 3]:
        raise ValueError(f"{path}: invalid axis order in the header (mapc, mapr, maps) = {axis_order}")
    file_axes = (axis_order[2], axis_order[1], axis_order[0])  # array axes 0, 1, 2
    return data.transpose([file_axes.index(3), file_axes.index(2), file_axes.index(1)])


def _slabs(shape, itemsize: int = 4) -> Iterator[slice]:
    per_slice = max(1, int(np.prod(shape[1:])) * itemsize)
    step = max(1, _SLAB_BYTES // per_slice)
    for z0 in range(0, shape[0], step):
        yield slice(z0, min(z0 + step, shape[0]))


def _raw_data(info: MrcInfo) -> tuple[np.ndarray, bool]:
    """The file's data in file axis order: (memory map, True) or (in-memory array, False)."""
    path = info.path
    if info.compressed is None:
        return np.memmap(path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=info.shape), True
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                raw = mrc.data
                if raw is None:
                    raise ValueError("no data block")
                raw = np.array(raw)
        except (ValueError, EOFError, OSError) as err:
            raise ValueError(f"{path}: cannot read the compressed data ({err}); the file is "
                             f"probably truncated or corrupt") from None
    if info.dtype == np.uint8 and raw.dtype == np.int8:
        raw = raw.view(np.uint8)
    return raw, False


def memmap_source(array) -> Optional[tuple]:
    """``(file, dtype, offset, shape)`` of a C-contiguous memory-mapped array (a view of one
    too), to map it again in another process; None for any other array."""
    if not isinstance(array, np.memmap) or not array.flags.c_contiguous or not array.filename:
        return None
    base = array
    while isinstance(base.base, np.ndarray):  # the array that owns the map (a view's offset is not its own)
        base = base.base
    if not isinstance(base, np.memmap) or getattr(base, "_mmap", None) is None:
        return None
    offset = int(base.offset) + (array.ctypes.data - base.ctypes.data)
    return (str(array.filename), array.dtype.str, offset, tuple(int(n) for n in array.shape))


def release_pages(array) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (Linux ``madvise``).

    The data stay in the operating system's file cache, so reading them again is cheap; the
    process just stops holding them (its RSS falls by what it had read). Stages that read a whole
    memory-mapped tomogram call it afterwards, so that a large tomogram is not held twice (as
    file pages and as a working copy). No-op for arrays that are not memory-mapped, for
    copy-on-write maps (whose changes would be lost) and where ``madvise`` is unavailable.

    Parameters
    ----------
    array : ndarray
        A :class:`numpy.memmap` or a view of one.
    """
    base = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    # only shared maps ("r", "r+", "w+"): dropping the pages of a copy-on-write map ("c") would
    # discard its changes
    if not isinstance(base, np.memmap) or getattr(base, "mode", None) not in ("r", "r+", "w+"):
        return
    base = getattr(base, "_mmap", None)
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        base.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # pragma: no cover - closed map, unsupported platform
        pass


def read_tomogram(path, voxel_size: float | None = None, *, mmap: bool = True,
                  check: bool = True) -> tuple[np.ndarray, float]:
    """Read a tomogram from an MRC file as float32 (Z, Y, X) and its voxel size in nm.

    Parameters
    ----------
    path : str or Path
        MRC/CCP4 file (``.mrc``, ``.rec``, ``.map``, ``.mrcs``, ... and ``.gz``/``.bz2``
        compressed ones). Content, not the name, decides.
    voxel_size : float, optional
        Voxel size in nm. Overrides the header (a warning is issued when they differ by more
        than 1 %). Required when the header has none, an implausible one (outside
        :data:`VOXEL_SIZE_RANGE_NM`) or an anisotropic one.
    mmap : bool
        Memory-map the file (default). An uncompressed native float32 file is then returned as
        a read-only memory map without reading it; other modes are converted to float32 slab by
        slab. ``mmap=False`` always returns an in-memory array.
    check : bool
        Scan the data for NaN/Inf and for a constant volume (one pass, slab by slab).

    Returns
    -------
    tomogram : ndarray of float32, shape (Z, Y, X)
        Possibly a read-only :class:`numpy.memmap`; never write to it.
    voxel_size : float
        Voxel size in nm.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        Not an MRC file, truncated, unsupported mode, not 3-D, NaN/Inf voxels, constant
        volume, missing/implausible/anisotropic header voxel size without ``voxel_size``.

    Notes
    -----
    3-D data is always read as a volume, whatever the space group says: IMOD writes
    reconstructed tomograms with space group 0 (image stack), so the header cannot tell a
    tomogram from a stack of 2-D images. A file named like a tilt series or image stack
    (``.mrcs``, ``.st``, ``.ali``) with space group 0 gets a warning. 2-D images and 4-D
    stacks of volumes are rejected. Mode 0 is signed int8 unless IMOD's header flag marks it
    unsigned (uint8). The file is protected from being overwritten by this module's writers
    (:func:`protect_path`).
    """
    path = _as_path(path, "read_tomogram")
    info = read_mrc_header(path)
    for note in info.warnings:
        warnings.warn(note, UserWarning, stacklevel=2)
    shape = info.shape
    if len(shape) == 2:
        raise ValueError(f"{path} holds a single 2-D image of {shape[1]} x {shape[0]} pixels; "
                         f"cryoves segments 3-D tomograms")
    if len(shape) == 4:
        raise ValueError(f"{path} holds a stack of {shape[0]} volumes (4-D data, space group "
                         f"{info.ispg}); cryoves segments one 3-D tomogram per file. Split the stack.")
    if len(shape) != 3:
        raise ValueError(f"{path}: unsupported data shape {shape}")
    vs = _voxel_size_from_header(info, voxel_size, path)
    name = path.name.lower()
    if info.ispg == 0 and name.endswith((".mrcs", ".st", ".ali", ".preali")):
        warnings.warn(f"{path.name} looks like a stack of 2-D images (tilt series or particle stack), "
                      f"not a reconstructed tomogram; reading it as a volume anyway", UserWarning,
                      stacklevel=2)

    raw, mapped = _raw_data(info)
    raw = _zyx_view(raw, info.axis_order, path)

    if raw.dtype == np.float32 and raw.dtype.isnative and (mmap or not mapped):
        out = raw  # read-only memory map (zero copy), or the decompressed array (already private)
    else:
        out = np.empty(raw.shape, dtype=np.float32)
        for sl in _slabs(raw.shape, max(4, raw.dtype.itemsize)):
            out[sl] = raw[sl]
        del raw
    if check:
        _check_values(out, path)
        release_pages(out)  # the scan read every page; they stay in the file cache, not in this process
    protect_path(path)
    return out, vs


def _check_values(data: np.ndarray, path) -> None:
    """NaN/Inf count (with the first affected Z slice) and constant-volume check, slab by slab."""
    check_finite(data, name=str(path), slab_bytes=_SLAB_BYTES)


def read_labels(path, *, check_shape: Sequence[int] | None = None) -> tuple[np.ndarray, float | None]:
    """Read an integer label / mask volume (e.g. a region mask, a Pyto label file).

    Parameters
    ----------
    path : str or Path
        MRC file with integer (or integer-valued float) voxels.
    check_shape : (Z, Y, X), optional
        Raise :class:`ValueError` if the volume does not have this shape.

    Returns
    -------
    labels : ndarray (int32 unless the file is uint16/uint8), in memory
    voxel_size : float or None
        The header voxel size in nm if plausible and isotropic, else None.

    Notes
    -----
    Unlike :func:`read_tomogram`, the file is not protected from the writers (an editor
    may save labels back to the file it opened).
    """
    path = _as_path(path, "read_labels")
    info = read_mrc_header(path)
    if len(info.shape) != 3:
        raise ValueError(f"{path}: a label volume must be 3-D, got shape {info.shape}")
    raw, _ = _raw_data(info)
    data = np.array(_zyx_view(raw, info.axis_order, path))  # in memory, writable
    del raw
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: a label volume must hold integers, found non-integer values")
        data = data.astype(np.int32)
    elif data.dtype not in (np.uint8, np.uint16):
        data = data.astype(np.int32)
    if check_shape is not None and tuple(data.shape) != tuple(int(s) for s in check_shape):
        raise ValueError(f"{path}: label volume has shape {data.shape} but the tomogram has "
                         f"{tuple(check_shape)}; they must match voxel for voxel")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vs = _voxel_size_from_header(info, None, path)
    except ValueError:
        vs = None
    return data, vs


# ----------------------------------------------------------------------------------------
# atomic writing
# ----------------------------------------------------------------------------------------
def check_output_dir(folder, *, create: bool = True) -> Path:
    """Make sure ``folder`` exists (created if ``create``) and is writable; return it.

    Raises
    ------
    NotADirectoryError
        If ``folder`` exists and is not a folder.
    PermissionError
        If files cannot be created in it (tested by creating and deleting a file).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output path {folder} exists and is not a folder")
    if not folder.exists():
        if not create:
            raise FileNotFoundError(f"output folder {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create output folder {folder}: {err.strerror or err}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".cryoves-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
    return folder


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {parent} does not exist")
    if os.path.lexists(path):
        if is_protected(path):
            raise PermissionError(f"refusing to write {path}: it is an input file of this run "
                                  f"(cryoves never replaces its inputs); choose another output name")
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (command line: "
                                  f"--overwrite) to replace it")


def _named_os_error(err: OSError, path: Path) -> OSError:
    """``err`` with a message naming ``path`` (e.g. "[Errno 27] File too large" alone names no file)."""
    if str(path) in str(err) or err.errno is None:
        return err
    why = err.strerror or str(err)
    extra = {27: " (a file-size limit is set: see 'ulimit -f')", 28: " (the disk is full)",
             122: " (the disk quota is exceeded)"}.get(err.errno, "")
    new = type(err)(err.errno, f"cannot write {path}: {why}{extra}")
    return new


@contextmanager
def atomic_path(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``path``, then move it into place.

    The temporary file is hidden (``.NAME.xxxx.part``) in the destination folder, so the final
    :func:`os.replace` is atomic; it is removed if the body raises. The target is checked before
    and after writing: an existing file is refused unless ``overwrite`` (:class:`FileExistsError`),
    a protected input file always (:class:`PermissionError`). An :class:`OSError` raised while
    writing (disk full, file-size limit) is re-raised with a message naming ``path``.

    Examples
    --------
    >>> with atomic_path("out.bin", overwrite=True) as tmp:  # doctest: +SKIP
    ...     np.save(tmp, array)
    """
    path = Path(path)
    _check_target(path, overwrite)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as err:
        raise PermissionError(f"cannot write to folder {path.parent}: {err.strerror or err}") from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except OSError as err:
            raise _named_os_error(err, path) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _check_target(path, overwrite)  # re-check: the target may have appeared meanwhile
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # atomic "create only if absent"
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; pass overwrite=True (command line: "
                                      f"--overwrite) to replace it") from None
            except OSError:  # no hard links on this file system
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path, text: str, *, overwrite: bool = False, newline: str | None = "") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path.

    ``newline=""`` (default) writes the text as it is; ``None`` translates ``\\n`` to the
    platform's line end.
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
    return Path(path)


def _mrc_dtype(data: np.ndarray) -> np.dtype:
    dt = data.dtype
    if dt in (np.float32, np.float16, np.int8, np.int16, np.uint16):
        return np.dtype(dt.newbyteorder("="))
    if dt == np.uint8:
        return np.dtype(np.uint16)  # MRC mode 0 is signed; widen (as mrcfile does)
    if dt == np.bool_:
        return np.dtype(np.int8)
    if dt.kind == "f":
        return np.dtype(np.float32)
    if dt.kind in "iu":
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if 0 <= lo and hi <= 65535:
            return np.dtype(np.uint16)
        if -32768 <= lo and hi <= 32767:
            return np.dtype(np.int16)
        raise ValueError(f"integer data in [{lo}, {hi}] does not fit any MRC integer mode "
                         f"(int16 or uint16); convert it to float32 first")
    raise TypeError(f"cannot write {dt} data to MRC (supported: float32, float16, int8, int16, "
                    f"uint8, uint16)")




def write_mrc(path, data, voxel_size: float, *, overwrite: bool = False, label: str | None = None) -> Path:
    """Write a 3-D volume to an MRC file, atomically.

    Parameters
    ----------
    path : str or Path
        Destination; ``.gz``/``.bz2`` endings write a compressed file.
    data : array_like, shape (Z, Y, X)
        float32, float16, int8, int16 and uint16 are written as they are (modes 2, 12, 0, 1, 6);
        uint8 and integer data in [0, 65535] as uint16; other integers that fit as int16;
        float64 as float32; bool as int8.
    voxel_size : float
        Voxel size in nm (written to the header in Å, isotropic).
    overwrite : bool
        Replace an existing file (never a protected input file).
    label : str, optional
        Text for the header's first label (default: "cryoves <version>").

    Returns
    -------
    Path
        The written path.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"write_mrc expects a 3-D (Z, Y, X) volume, got shape {data.shape}")
    check_voxel_size(voxel_size)
    dtype = _mrc_dtype(data)
    return _write_mrc_slabs(path, data.shape, dtype, lambda sl: data[sl].astype(dtype, copy=False), voxel_size,
                            overwrite=overwrite, label=label)


def _write_mrc_slabs(path, shape, dtype, slab, voxel_size: float, *, overwrite: bool = False,
                     label: str | None = None) -> Path:
    """:func:`write_mrc` of the volume whose slab ``sl`` (a slice of planes) is ``slab(sl)``, an
    array of ``dtype`` (an MRC mode's): the volume is never whole in memory (except for a
    compressed file). An error raised by ``slab`` leaves nothing written."""
    import mrcfile

    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    vs = check_voxel_size(voxel_size)
    text = (label or f"cryoves {__version__}")[:80]
    path = Path(path)
    compression = ("gzip" if path.name.lower().endswith(".gz")
                   else "bzip2" if path.name.lower().endswith(".bz2") else None)
    with atomic_path(path, overwrite=overwrite) as tmp:
        if compression is not None:
            data = np.empty(shape, dtype=dtype)
            for sl in _slabs(shape, 8):
                data[sl] = slab(sl)
            with mrcfile.new(tmp, overwrite=True, compression=compression) as mrc:
                mrc.set_data(data)
                mrc.set_volume()
                mrc.voxel_size = vs * 10.0
                mrc.add_label(text)
        else:
            mode = {np.dtype(np.float32): 2, np.dtype(np.float16): 12, np.dtype(np.int8): 0,
                    np.dtype(np.int16): 1, np.dtype(np.uint16): 6}[dtype]
            # no warnings.catch_warnings() here: it is not thread-safe (export_results writes its
            # files on threads), and this call warns about nothing
            mrc = mrcfile.new_mmap(tmp, shape=shape, mrc_mode=mode, overwrite=True)
            try:
                dmin, dmax, total, total_sq = np.inf, -np.inf, 0.0, 0.0
                for sl in _slabs(shape, 8):
                    part = slab(sl)
                    mrc.data[sl] = part
                    if dtype.kind in "iu":
                        # integers (labels: mostly 0): the sums over the non-zero voxels, exact in int64
                        nz = part[part != 0].astype(np.int64)
                        lo_, hi_ = (int(nz.min()), int(nz.max())) if nz.size else (0, 0)
                        if nz.size < part.size:
                            lo_, hi_ = min(lo_, 0), max(hi_, 0)
                        dmin, dmax = min(dmin, float(lo_)), max(dmax, float(hi_))
                        total += float(nz.sum())
                        total_sq += float(np.dot(nz, nz))
                        continue
                    s64 = part.astype(np.float64)
                    dmin, dmax = min(dmin, float(s64.min())), max(dmax, float(s64.max()))
                    total += float(s64.sum())
                    total_sq += float(np.square(s64).sum())
                n = int(np.prod(shape))
                mean = total / n
                mrc.set_volume()
                mrc.voxel_size = vs * 10.0
                mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = dmin, dmax, mean
                mrc.header.rms = math.sqrt(max(total_sq / n - mean * mean, 0.0))
                mrc.add_label(text)
                mrc.flush()
            finally:
                mrc.close()
    return path


def write_labels_mrc(path, labels, voxel_size: float, *, overwrite: bool = False,
                     label: str | None = None) -> Path:
    """Write a label volume as uint16 MRC (mode 6), atomically.

    Raises
    ------
    TypeError
        If ``labels`` is not an integer or boolean array.
    ValueError
        If a label is negative or above 65535.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if labels.size and labels.dtype.kind != "b":
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"label ids must be in [0, 65535] to be written as uint16, got [{lo}, {hi}]; "
                             f"renumber the table (VesicleTable.renumbered) first")
    # integer labels (range checked above) go to write_mrc as they are: it picks uint16 for
    # them and converts slab by slab (no uint16 copy of the whole volume)
    data = labels.astype(np.uint16) if labels.dtype.kind == "b" else labels
    return write_mrc(path, data, voxel_size, overwrite=overwrite,
                     label=label or f"cryoves {__version__} labels")


def write_pyto_labels(path, table: VesicleTable, shape: Sequence[int], voxel_size: float | None = None, *,
                      mask=None, active_zone=None, first_id: int = 10, overwrite: bool = False,
                      labels=None) -> Path:
    """Write a Pyto-ready label file (uint16 MRC).

    Pyto's convention: the region analysed (cytoplasm) = 1, the active-zone membrane = 2,
    vesicles numbered from ``first_id`` (10) upward in table order. Only accepted rows are
    drawn, as filled spheres over the region.

    Parameters
    ----------
    path : str or Path
    table : VesicleTable
    shape : (Z, Y, X)
        Tomogram shape.
    voxel_size : float, optional
        nm; default: the table's.
    mask : array_like of bool, optional
        Region mask (voxels set to 1).
    active_zone : array_like of bool, optional
        Active-zone membrane (voxels set to 2, over the region).
    first_id : int
        Id of the first vesicle (Pyto: 10).
    overwrite : bool
    labels : (Z, Y, X) int array, optional
        ``render_labels(table, shape)`` (the accepted vesicles by their ids), e.g. the label
        volume of the same result: its ids are renumbered slab by slab instead of drawing the
        spheres again (the same voxels: which sphere a voxel belongs to does not depend on the
        values drawn). A value that is no accepted row's id is an error.

    Returns
    -------
    Path
    """
    shape = tuple(int(s) for s in shape)
    vs = table.voxel_size if voxel_size is None else voxel_size
    if vs is None:
        raise ValueError("voxel_size is unknown: pass voxel_size= or use a table with voxel_size")
    acc = table.accepted()
    if first_id < 3:
        raise ValueError(f"first_id must be >= 3 (1 and 2 are the region and the active zone), got {first_id}")
    if first_id + len(acc) - 1 > 65535:
        raise ValueError(f"{len(acc)} vesicles numbered from {first_id} do not fit in uint16")
    regions = []
    for name, m, value in (("mask", mask, 1), ("active_zone", active_zone, 2)):
        if m is None:
            continue
        m = np.asarray(m)
        if m.shape != shape:
            raise ValueError(f"{name} has shape {m.shape}, the tomogram {shape}")
        regions.append((m, value))
    text = f"cryoves {__version__} Pyto labels: 1 region, 2 AZ, vesicles from {first_id}"
    if labels is None:
        out = render_labels(acc, shape, ids=np.arange(first_id, first_id + len(acc)), dtype=np.uint16)
        slab = None
    else:
        # renumbered slab by slab as the file is written: no second volume in memory
        lut = _renumber_lut(labels, acc.ids, first_id, shape)
        slab = functools.partial(_renumbered_slab, labels, lut)

    def with_regions(sl):
        part = out[sl] if slab is None else slab(sl)
        if regions:
            free = part == 0
            for m, value in regions:
                part[free & np.asarray(m[sl]).astype(bool)] = value
        return part

    return _write_mrc_slabs(path, shape, np.uint16, with_regions, vs, overwrite=overwrite, label=text)


def _renumber_lut(labels, ids, first_id: int, shape) -> np.ndarray:
    """Lookup table of :func:`_renumbered_slab`: ``labels``' value ``ids[k]`` to ``first_id + k``
    (0 stays 0; -1: no accepted row), after checking ``labels``' shape and type."""
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"labels have shape {labels.shape}, the tomogram {shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer volume, got {labels.dtype}")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids.min() <= 0:
        raise ValueError("vesicle ids must be positive to be found in a label volume")
    lut = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, dtype=np.int32)  # -1: no accepted row
    lut[0] = 0
    lut[ids] = np.arange(first_id, first_id + len(ids), dtype=np.int32)
    return lut


def _renumbered_slab(labels, lut: np.ndarray, sl) -> np.ndarray:
    """The uint16 slab ``sl`` of ``labels`` through ``lut`` (:func:`_renumber_lut`); a value that is
    no accepted vesicle's id is an error."""
    part = np.asarray(labels[sl])
    lo, hi = (int(part.min()), int(part.max())) if part.size else (0, 0)
    if lo < 0 or hi >= len(lut):
        raise ValueError(f"labels hold the value {lo if lo < 0 else hi}, which is no accepted vesicle's id")
    v = lut[part]
    if v.min(initial=0) < 0:
        bad = int(part[v < 0][0])
        raise ValueError(f"labels hold the value {bad}, which is no accepted vesicle's id")
    return v.astype(np.uint16)


# ----------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------
_INT_COLUMNS = {"id"}
_STR_COLUMNS = {name for name, dt in COLUMNS.items() if dt is object}
_NM_COLUMNS = ("z_nm", "y_nm", "x_nm", "radius_nm", "thickness_nm")


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v)


@contextmanager
def _atomic_text(path, overwrite: bool, newline: str | None = None):
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            yield fh


def vesicles_csv_text(table: VesicleTable) -> str:
    """The vesicle table as CSV text, exactly as :func:`write_vesicles_csv` writes it."""
    import io as _stdio

    cols = table.to_dict(nm=True)
    names = list(cols)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    for i in range(len(table)):
        writer.writerow([_fmt(cols[n][i]) for n in names])
    return buf.getvalue()


def write_vesicles_csv(path, table: VesicleTable, *, overwrite: bool = False) -> Path:
    """Write every row and column of ``table`` to CSV (comma-separated, header row, UTF-8).

    Columns: ``id, z, y, x, radius, thickness, density, pvalue, stage, status, note`` (voxels),
    then, when the table has a voxel size, ``z_nm, y_nm, x_nm, radius_nm, thickness_nm,
    voxel_size_nm``. Floats are written with full precision (``repr``), so
    :func:`read_vesicles_csv` gives back exactly the same table; missing values are ``nan``.
    """
    return atomic_write_text(path, vesicles_csv_text(table), overwrite=overwrite, newline="")


def read_vesicles_csv(path, *, voxel_size: float | None = None) -> VesicleTable:
    """Read a vesicle table written by :func:`write_vesicles_csv` (or any CSV with those columns).

    Parameters
    ----------
    path : str or Path
    voxel_size : float, optional
        nm. Needed when the file has no ``voxel_size_nm`` column (or no rows), or to convert
        a file that gives only nm coordinates (``z_nm, y_nm, x_nm, radius_nm``).

    Returns
    -------
    VesicleTable
        The voxel columns are canonical; nm columns are only used when voxel columns are
        missing (a warning is issued if both are present and disagree, e.g. after editing one
        of them in a spreadsheet).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            names = [n.strip() for n in next(reader)]
        except StopIteration:
            raise ValueError(f"{path} is empty; expected a CSV header row") from None
        rows = [r for r in reader if r]
    for lineno, r in enumerate(rows, start=2):
        if len(r) != len(names):
            raise ValueError(f"{path}, line {lineno}: {len(r)} fields but the header has {len(names)}")
    raw = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    vs = voxel_size
    if "voxel_size_nm" in raw and raw["voxel_size_nm"]:
        file_vs = {float(v) for v in raw["voxel_size_nm"]}
        if len(file_vs) > 1:
            raise ValueError(f"{path}: several voxel sizes in one table: {sorted(file_vs)}")
        file_vs = file_vs.pop()
        if vs is None:
            vs = file_vs
        elif abs(file_vs - vs) > 1e-9 * vs:
            warnings.warn(f"{path.name}: voxel_size={vs} nm given, the file says {file_vs} nm; using "
                          f"{vs} nm (voxel columns are kept as they are)", UserWarning, stacklevel=2)
    columns: dict[str, object] = {}
    for name in COLUMNS:
        if name in raw:
            if name in _STR_COLUMNS:
                columns[name] = raw[name]
            elif name in _INT_COLUMNS:
                columns[name] = [int(float(v)) for v in raw[name]]
            else:
                columns[name] = [float(v) if v.strip() else math.nan for v in raw[name]]
        elif f"{name}_nm" in raw:
            if vs is None:
                raise ValueError(f"{path} gives {name}_nm but no voxel size: pass voxel_size=")
            columns[name] = [float(v) / vs for v in raw[f"{name}_nm"]]
    missing = [n for n in ("z", "y", "x", "radius") if n not in columns]
    if missing and rows:
        raise ValueError(f"{path}: missing column(s) {missing} (nor their _nm versions); columns found: {names}")
    table = VesicleTable(columns if rows else {}, voxel_size=vs)
    if vs is not None and rows:
        for name in ("z", "y", "x", "radius", "thickness"):
            nm_name = f"{name}_nm"
            if name in raw and nm_name in raw:
                nm_vals = np.array([float(v) for v in raw[nm_name]])
                ok = np.isclose(nm_vals, table[name] * vs, rtol=1e-6, atol=1e-9, equal_nan=True)
                if not np.all(ok):
                    warnings.warn(f"{path.name}: column {nm_name} disagrees with {name} x voxel size in "
                                  f"{int(np.sum(~ok))} row(s); the voxel column {name!r} is used",
                                  UserWarning, stacklevel=2)
    return table


# ----------------------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------------------
def _star_value(v) -> str:
    s = _fmt(v)
    if s == "" or any(c.isspace() for c in s) or s.startswith(("_", "#", "'", '"', "data_", "loop_")):
        return '"' + s.replace('"', "'") + '"'
    return s


def write_star(path, table: VesicleTable, *, tomo_name: str | None = None, accepted_only: bool = True,
               overwrite: bool = False) -> Path:
    """Write vesicle centres as a RELION-style STAR file (one ``data_particles`` loop).

    Columns, in order: ``_rlnTomoName`` (only if ``tomo_name`` is given), ``_rlnCoordinateX``,
    ``_rlnCoordinateY``, ``_rlnCoordinateZ`` (voxels of this tomogram, 0-based, X Y Z order:
    ``x, y, z`` of the table), then ``_cryovesId``, ``_cryovesRadiusNm``, ``_cryovesPValue``,
    ``_cryovesVoxelSizeNm``. Only accepted rows unless ``accepted_only=False``.
    """
    t = table.accepted() if accepted_only else table
    vs = t.voxel_size
    radius_nm = t.nm("radius") if vs is not None else np.full(len(t), np.nan)
    labels = (["_rlnTomoName"] if tomo_name is not None else []) + [
        "_rlnCoordinateX", "_rlnCoordinateY", "_rlnCoordinateZ",
        "_cryovesId", "_cryovesRadiusNm", "_cryovesPValue", "_cryovesVoxelSizeNm"]
    with _atomic_text(path, overwrite) as fh:
        fh.write(f"# written by cryoves {__version__}: vesicle centres in voxels of the tomogram "
                 f"(0-based), radius in nm\n\n")
        fh.write("data_particles\n\nloop_\n")
        for i, lab in enumerate(labels, start=1):
            fh.write(f"{lab} #{i}\n")
        for i in range(len(t)):
            vals = ([tomo_name] if tomo_name is not None else []) + [
                t["x"][i], t["y"][i], t["z"][i], int(t["id"][i]), radius_nm[i], t["pvalue"][i],
                math.nan if vs is None else vs]
            fh.write(" ".join(_star_value(v) for v in vals) + "\n")
        fh.write("\n")
    return Path(path)


def _parse_star(path: Path) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Blocks of a STAR file: name -> (loop labels, rows). Non-loop key/value pairs become a 1-row table."""
    blocks: dict[str, tuple[list[str], list[list[str]]]] = {}
    current = None
    labels: list[str] = []
    rows: list[list[str]] = []
    in_loop = False
    pairs: dict[str, str] = {}

    def close():
        if current is None:
            return
        if labels:
            blocks[current] = (list(labels), list(rows))
        elif pairs:
            blocks[current] = (list(pairs), [list(pairs.values())])

    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.startswith("data_"):
                close()
                current, labels, rows, pairs, in_loop = s[5:], [], [], {}, False
                continue
            if current is None:
                raise ValueError(f"{path}, line {lineno}: text before the first data_ block")
            if s == "loop_":
                in_loop, labels, rows = True, [], []
                continue
            if s.startswith("_"):
                parts = s.split(None, 1)
                if in_loop and not rows:
                    labels.append(parts[0])
                else:
                    in_loop = False
                    pairs[parts[0]] = parts[1].split("#")[0].strip() if len(parts) > 1 else ""
                continue
            if in_loop:
                fields = shlex.split(s, comments=False, posix=True)
                if len(fields) != len(labels):
                    raise ValueError(f"{path}, line {lineno}: {len(fields)} values for {len(labels)} columns")
                rows.append(fields)
                continue
            raise ValueError(f"{path}, line {lineno}: unexpected text {s[:40]!r}")
    close()
    return blocks


def read_star(path, *, voxel_size: float | None = None, tomo_name: str | None = None) -> VesicleTable:
    """Read vesicles (or any picked coordinates) from a STAR file.

    Parameters
    ----------
    path : str or Path
    voxel_size : float, optional
        nm; default ``_cryovesVoxelSizeNm`` from the file. Needed to convert
        ``_cryovesRadiusNm`` to voxels.
    tomo_name : str, optional
        Keep only rows whose ``_rlnTomoName`` equals this.

    Returns
    -------
    VesicleTable
        ``x, y, z`` from ``_rlnCoordinateX/Y/Z``; ``radius`` from ``_cryovesRadiusNm`` (NaN if
        absent); ``id`` from ``_cryovesId`` (1..N if absent); ``pvalue`` from ``_cryovesPValue``;
        stage ``"import"``, status ``"accepted"``. Uses the ``data_particles`` block, else the
        first block with ``_rlnCoordinateX``.
    """
    path = Path(path)
    blocks = _parse_star(path)
    block = blocks.get("particles")
    if block is None or "_rlnCoordinateX" not in block[0]:
        block = next((b for b in blocks.values() if "_rlnCoordinateX" in b[0]), None)
    if block is None:
        raise ValueError(f"{path}: no STAR block with _rlnCoordinateX/Y/Z found (blocks: {list(blocks)})")
    labels, rows = block
    col = {lab: i for i, lab in enumerate(labels)}
    for need in ("_rlnCoordinateX", "_rlnCoordinateY", "_rlnCoordinateZ"):
        if need not in col:
            raise ValueError(f"{path}: column {need} missing")
    if tomo_name is not None:
        if "_rlnTomoName" not in col:
            raise ValueError(f"{path}: no _rlnTomoName column to select tomogram {tomo_name!r}")
        rows = [r for r in rows if r[col["_rlnTomoName"]] == tomo_name]

    def fcol(name, default=math.nan):
        if name not in col:
            return np.full(len(rows), default, dtype=np.float64)
        return np.array([float(r[col[name]]) for r in rows], dtype=np.float64)

    vs = voxel_size
    if vs is None and "_cryovesVoxelSizeNm" in col and rows:
        vals = fcol("_cryovesVoxelSizeNm")
        vals = vals[np.isfinite(vals)]
        if vals.size:
            vs = float(vals[0])
    radius_nm = fcol("_cryovesRadiusNm")
    if vs is None:
        if np.any(np.isfinite(radius_nm)):
            raise ValueError(f"{path}: radii are in nm but the voxel size is unknown; pass voxel_size=")
        radius = radius_nm
    else:
        radius = radius_nm / vs
    columns = {"x": fcol("_rlnCoordinateX"), "y": fcol("_rlnCoordinateY"), "z": fcol("_rlnCoordinateZ"),
               "radius": radius, "pvalue": fcol("_cryovesPValue"), "stage": "import", "status": "accepted"}
    if "_cryovesId" in col:
        columns["id"] = [int(float(r[col["_cryovesId"]])) for r in rows]
    return VesicleTable(columns if rows else {}, voxel_size=vs)


# ----------------------------------------------------------------------------------------
# IMOD binary model
# ----------------------------------------------------------------------------------------
_IMOD_UNITS_NM = {0: None, 3: 1e12, 1: 1e9, -2: 1e7, -3: 1e6, -6: 1e3, -9: 1.0, -10: 0.1, -12: 1e-3}
_OBJFLAG_OPEN = 1 << 3
_OBJFLAG_SCAT = 1 << 9
_MODEL_HEADER = struct.Struct(">128s4i I 4i 6f 3i 2i f 2i 3f")      # 232 bytes
_OBJECT_HEADER = struct.Struct(">64s16I 2i I i 3f i 8B 2i")         # 176 bytes
_CONTOUR_HEADER = struct.Struct(">iIii")                             # 16 bytes
assert _MODEL_HEADER.size == 232 and _OBJECT_HEADER.size == 176


def write_imod_model(path, table: VesicleTable, shape: Sequence[int], voxel_size: float | None = None, *,
                     accepted_only: bool = True, name: str = "vesicles",
                     color: tuple[float, float, float] = (0.0, 1.0, 0.0), overwrite: bool = False) -> Path:
    """Write the vesicles as an IMOD binary model (``.mod``): one object of scattered points.

    Each vesicle is one contour with one point at its centre, a per-point size (the sphere
    radius in pixels, IMOD's ``SIZE`` chunk) and the vesicle id as the contour's surface
    number. 3dmod shows every vesicle as a sphere of its radius. IMOD's coordinates are
    X, Y, Z in pixels with the first pixel's corner at X = Y = 0 and the first section's
    centre at Z = 0, so a centre at array index (z, y, x) is written as (x + 0.5, y + 0.5, z).

    Parameters
    ----------
    path : str or Path
    table : VesicleTable
    shape : (Z, Y, X)
        Tomogram shape (the model's image size xmax, ymax, zmax).
    voxel_size : float, optional
        nm (model header pixel size, units nm); default: the table's.
    accepted_only : bool
    name : str
        Object name.
    color : (r, g, b) in 0..1
    overwrite : bool
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {shape}")
    vs = table.voxel_size if voxel_size is None else check_voxel_size(voxel_size)
    t = table.accepted() if accepted_only else table
    n = len(t)
    radii = np.nan_to_num(t.radii, nan=0.0)
    med = float(np.median(radii)) if n else 0.0
    chunks = [b"IMODV1.2"]
    chunks.append(_MODEL_HEADER.pack(
        f"cryoves {__version__} vesicles".encode()[:127],
        shape[2], shape[1], shape[0],          # xmax, ymax, zmax
        1,                                     # objsize
        0,                                     # flags
        1, 1, 0, 255,                          # drawmode, mousemode, blacklevel, whitelevel
        0.0, 0.0, 0.0,                         # offsets
        1.0, 1.0, 1.0,                         # x/y/z scale
        0, 0, 0,                               # current object, contour, point
        3, 128,                                # res, thresh
        float(vs) if vs is not None else 1.0,  # pixsize
        -9 if vs is not None else 0,           # units: nm (-9) or pixels (0)
        0,                                     # csum
        0.0, 0.0, 0.0))                        # alpha, beta, gamma
    chunks.append(b"OBJT")
    chunks.append(_OBJECT_HEADER.pack(
        name.encode()[:63], *([0] * 16),
        n,                                     # contsize
        _OBJFLAG_SCAT | _OBJFLAG_OPEN,         # flags: scattered points
        0, 1,                                  # axis, drawmode
        float(color[0]), float(color[1]), float(color[2]),
        max(1, int(round(med))),               # pdrawsize: default sphere radius (pixels)
        1, 3, 1, 1, 0, 0, 0, 0,                # symbol, symsize, linewidth2, linewidth, linesty, symflags, sympad, trans
        0, 0))                                 # meshsize, surfsize
    for i in range(n):
        chunks.append(b"CONT")
        chunks.append(_CONTOUR_HEADER.pack(1, 0, 0, int(t["id"][i])))
        chunks.append(struct.pack(">3f", t["x"][i] + 0.5, t["y"][i] + 0.5, t["z"][i]))
        chunks.append(b"SIZE" + struct.pack(">if", 4, radii[i]))
    chunks.append(b"IEOF")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"".join(chunks))
    return Path(path)


def read_imod_model(path, *, voxel_size: float | None = None, return_shape: bool = False):
    """Read scattered points of an IMOD binary model as a vesicle table.

    Every point of every object becomes a row: ``(z, y, x) = (Z, Y - 0.5, X - 0.5)`` (inverse
    of :func:`write_imod_model`), radius from the point's ``SIZE`` entry, else the object's
    default sphere size (``pdrawsize``) when non-zero, else NaN. Ids: the contour's surface
    number when every one is a distinct positive integer (as cryoves writes them), else 1..N.
    Meshes and other chunks are skipped.

    Parameters
    ----------
    path : str or Path
    voxel_size : float, optional
        nm; default: the model header's pixel size when its units are not pixels.
    return_shape : bool
        Also return the image size (Z, Y, X) from the header.

    Returns
    -------
    VesicleTable, or (VesicleTable, (Z, Y, X)) with ``return_shape``
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8 + _MODEL_HEADER.size or data[:4] != b"IMOD":
        raise ValueError(f"{path} is not an IMOD binary model (it does not start with 'IMOD')")
    hdr = _MODEL_HEADER.unpack_from(data, 8)
    xmax, ymax, zmax = hdr[1], hdr[2], hdr[3]
    pixsize, units = hdr[21], hdr[22]
    pos = 8 + _MODEL_HEADER.size
    xs, ys, zs, rs, surfs = [], [], [], [], []
    default_size = 0.0

    def take(fmt_or_n):
        nonlocal pos
        if isinstance(fmt_or_n, int):
            end = pos + fmt_or_n
            if end > len(data):
                raise ValueError(f"{path} is truncated or corrupt (chunk runs past the end)")
            out = data[pos:end]
            pos = end
            return out
        s = struct.Struct(fmt_or_n)
        if pos + s.size > len(data):
            raise ValueError(f"{path} is truncated or corrupt (chunk runs past the end)")
        out = s.unpack_from(data, pos)
        pos += s.size
        return out

    last_cont = None  # (start index in rows, npoints)
    while True:
        if pos + 4 > len(data):
            raise ValueError(f"{path} is truncated: no IEOF marker")
        cid = take(4)
        if cid == b"IEOF":
            break
        if cid == b"OBJT":
            obj = _OBJECT_HEADER.unpack_from(data, pos)
            pos += _OBJECT_HEADER.size
            default_size = float(obj[24])  # pdrawsize
        elif cid == b"CONT":
            psize, _flags, _time, surf = take(">iIii")
            if psize < 0:
                raise ValueError(f"{path} is corrupt (negative point count)")
            pts = np.frombuffer(take(12 * psize), dtype=">f4").reshape(-1, 3).astype(np.float64)
            last_cont = (len(xs), psize)
            xs.extend(pts[:, 0] - 0.5)
            ys.extend(pts[:, 1] - 0.5)
            zs.extend(pts[:, 2])
            rs.extend([default_size if default_size > 0 else math.nan] * psize)
            surfs.extend([surf] * psize)
        elif cid == b"MESH":
            vsize, lsize, _flag, _time, _surf = take(">iiIhh")
            take(12 * vsize + 4 * lsize)
        elif cid == b"SIZE":
            (nbytes,) = take(">i")
            sizes = np.frombuffer(take(nbytes), dtype=">f4").astype(np.float64)
            if last_cont is not None:
                start, npts = last_cont
                k = min(npts, len(sizes))
                rs[start:start + k] = list(sizes[:k])
        elif len(cid) == 4 and cid.isalnum():
            (nbytes,) = take(">i")
            take(nbytes)
        else:
            raise ValueError(f"{path} is corrupt (unknown chunk {cid!r} at byte {pos - 4})")
    vs = voxel_size
    if vs is None and _IMOD_UNITS_NM.get(units) and pixsize > 0:
        vs = float(pixsize) * _IMOD_UNITS_NM[units]
    columns = {"z": zs, "y": ys, "x": xs, "radius": rs, "stage": "import", "status": "accepted"}
    if surfs and min(surfs) > 0 and len(set(surfs)) == len(surfs):
        columns["id"] = surfs
    table = VesicleTable(columns if xs else {}, voxel_size=vs)
    if return_shape:
        return table, (zmax, ymax, xmax)
    return table
