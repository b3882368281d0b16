"""The plugin's model service: every TensorFlow call runs in one long-lived worker thread.

TensorFlow must stay in one thread: a Keras model and its traced functions were seen to crash
(segfault in graph tracing) when a cached model was used from another pooled thread. So the
dock widgets never load or run a network themselves: their napari worker thread hands the work
to :func:`run_in_tf_thread` and waits (the GUI thread stays free). Models are loaded (once per
weights file) inside that thread by :func:`get_model`.

This module is also the one place where the plugin asks the core about weights:
:func:`describe_weights` (training voxel size and a one-line description, without TensorFlow)
and :func:`get_model` (a loaded model, cached).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_in_tf_thread", "get_model", "describe_weights", "weights_path"]

_LOCK = threading.Lock()
_EXECUTOR = None
_MODELS: dict[str, Any] = {}
#: Training voxel size (nm) of the reference CryoVesNet weights.h5 (no model card).
REFERENCE_WEIGHTS_VOXEL_NM = 2.2


def run_in_tf_thread(fn: Callable, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in the plugin's TensorFlow thread and return its result.

    The thread is started on first use with a 64 MB stack and lives as long as the process.
    Called from a napari worker thread (never from the GUI thread: it blocks until ``fn``
    returns). Exceptions, including :class:`cryoves.Cancelled` raised by a progress callback,
    propagate to the caller.
    """
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            from concurrent.futures import ThreadPoolExecutor

            old = threading.stack_size()
            threading.stack_size(64 * 1024 * 1024)
            try:
                ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryoves-tensorflow")
                ex.submit(lambda: None).result()  # start the thread now, with the large stack
            finally:
                threading.stack_size(old)
            _EXECUTOR = ex
    return _EXECUTOR.submit(fn, *args, **kwargs).result()


def weights_path(value) -> str | None:
    """A weights field's value -> path string, or None for the default weights."""
    if value is None:
        return None
    s = str(value).strip()
    return None if s in ("", ".") else s


def get_model(path: str | None):
    """The U-Net of the weights at ``path`` (None: default weights), loaded once per file.

    Only inside :func:`run_in_tf_thread`: the model is used in that thread only.
    """
    if threading.current_thread().name.split("_")[0] != "cryoves-tensorflow":
        raise RuntimeError("cryoves: models are loaded and used in the TensorFlow thread only")
    from cryoves._tf import import_tensorflow

    import_tensorflow()
    from cryoves.model import load_model

    key = str(Path(path).expanduser().resolve()) if path else "<default>"
    if key not in _MODELS:
        _MODELS.clear()  # keep one network in memory
        _MODELS[key] = load_model(path)
    return _MODELS[key]


def describe_weights(path: str | None) -> tuple[float | None, str]:
    """Training voxel size and a one-line description of the weights at ``path`` (no TensorFlow).

    Parameters
    ----------
    path : str or None
        Weights file or folder (``None``: the default weights shipped with cryoves).

    Returns
    -------
    voxel_size_nm : float or None
        None if the weights cannot be used (the description says why).
    description : str
    """
    from cryoves import model as _model

    try:
        p = Path(path).expanduser() if path else _model.default_weights_path()
    except FileNotFoundError:
        return None, ("No default weights are installed with cryoves: choose a weights file "
                      "(cryoves NAME.weights.h5, or the CryoVesNet weights.h5).")
    if not p.exists():
        return None, f"Weights file not found: {p}"
    if p.is_dir():
        cands = sorted(p.glob("*.weights.h5")) + sorted(p.glob("*.h5"))
        if not cands:
            return None, f"No weights (*.h5) in folder {p}"
        return describe_weights(str(cands[0]))
    if p.name.endswith(".weights.h5"):
        card = p.parent / (p.name[: -len(".weights.h5")] + ".json")
        if card.is_file():
            try:
                c = _model.ModelCard.from_json(card)
                return float(c.voxel_size_nm), f"{c.name} (trained at {c.voxel_size_nm:.2f} nm)"
            except Exception as exc:  # noqa: BLE001 - any broken card: say which file
                return None, f"Invalid model card {card.name}: {exc}"
    try:
        import h5py

        with h5py.File(p, "r") as fh:
            if "model_config" in fh.attrs:
                return REFERENCE_WEIGHTS_VOXEL_NM, (
                    f"CryoVesNet reference weights {p.name} (trained at {REFERENCE_WEIGHTS_VOXEL_NM:.1f} nm)")
    except OSError as exc:
        return None, f"Not an HDF5 weights file: {p.name} ({exc})"
    return None, f"{p.name} is neither cryoves weights (with a .json card) nor CryoVesNet weights"
