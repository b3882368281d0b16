"""Where the editor keeps its edit log, autosave and base table (Qt-free helpers of the editor widget).

Every edit is appended to ``<stem>_edits.jsonl`` (by :class:`cryoves.edit.VesicleEditor`) and the
table is autosaved to ``<stem>_vesicles_autosave.csv``; the table the editing started from is
kept as ``<stem>_edits_base.csv``, so the log can be replayed over it
(:meth:`cryoves.edit.VesicleEditor.restore`). The folder is the one the user chose in the widget,
or else a per-user cache folder keyed by the tomogram's file path, size and modification time
(so reopening the same file finds its edits and a changed file does not).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EditPaths", "edit_paths", "tomogram_key", "cache_root"]


def cache_root() -> Path:
    """The per-user cache folder of cryoves' edit logs (``CRYOVES_CACHE_DIR`` overrides it)."""
    env = os.environ.get("CRYOVES_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cryoves")) / "edits"


def _source_path(layer) -> Path | None:
    meta = getattr(layer, "metadata", {}) or {}
    src = meta.get("cryoves_source")
    if not src:
        src = getattr(getattr(layer, "source", None), "path", None)
    if not src:
        return None
    p = Path(str(src)).expanduser()
    return p if p.is_file() else None


def tomogram_key(layer, data) -> tuple[str, str]:
    """``(key, description)`` identifying the tomogram of ``layer``.

    File-backed: hash of the resolved path, file size and mtime. In memory: hash of the
    layer name, shape, dtype and three planes of the data.
    """
    src = _source_path(layer)
    h = hashlib.sha1()
    if src is not None:
        st = src.stat()
        h.update(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16], str(src)
    h.update(f"{layer.name}|{tuple(data.shape)}|{data.dtype}".encode())
    for z in (0, data.shape[0] // 2, data.shape[0] - 1):
        h.update(np.ascontiguousarray(data[z]).tobytes())
    return h.hexdigest()[:16], f"layer {layer.name!r} (in memory)"


@dataclass(frozen=True)
class EditPaths:
    """Files of one editing session."""

    folder: Path
    stem: str

    @property
    def log(self) -> Path:
        return self.folder / f"{self.stem}_edits.jsonl"

    @property
    def base(self) -> Path:
        return self.folder / f"{self.stem}_edits_base.csv"

    @property
    def autosave(self) -> Path:
        return self.folder / f"{self.stem}_vesicles_autosave.csv"

    def n_logged(self) -> int:
        """Number of logged operations (edits, undos, redos; 0 without a log or a base table to replay it on)."""
        if not (self.log.is_file() and self.base.is_file()):
            return 0
        with open(self.log, "rb") as fh:  # edits, undos and redos; not the header line
            return sum(1 for line in fh if b'"op":' in line)

    def when(self) -> str:
        """Local time of the last logged edit."""
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.log.stat().st_mtime))

    def set_aside(self) -> list[Path]:
        """Rename an existing log / base / autosave to ``*.<timestamp>.*`` (never deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = []
        for p in (self.log, self.base, self.autosave):
            if p.exists():
                target = p.with_name(f"{p.stem}.{stamp}{p.suffix}")
                p.replace(target)
                out.append(target)
        return out


def edit_paths(layer, data, folder=None) -> EditPaths:
    """The :class:`EditPaths` of the tomogram of ``layer`` (``folder``: the user's choice, or None).

    Raises
    ------
    ValueError
        If ``folder`` exists and is not a folder, or cannot be created or written.
    """
    key, _ = tomogram_key(layer, data)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(layer.name)).strip("_") or "tomogram"
    if folder is not None and str(folder).strip() not in ("", "."):
        f = Path(str(folder)).expanduser()
        stem = name
    else:
        f = cache_root() / key
        stem = name
    try:
        f.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot use the edits folder {f}: {exc.strerror or exc}") from None
    if not os.access(f, os.W_OK):
        raise ValueError(f"the edits folder {f} is not writable: choose another one")
    return EditPaths(f, stem)
