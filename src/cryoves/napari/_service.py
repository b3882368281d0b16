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
from typing import Callable

__all__ = ["run_in_tf_thread", "get_model", "describe_weights", "weights_path"]

_LOCK = threading.Lock()
_EXECUTOR = None


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
    """The U-Net of the weights at ``path`` (None: default weights), from the core's one model
    cache (:func:`cryoves.model.get_model`).

    Only inside :func:`run_in_tf_thread`: the model is used in that thread only.
    """
    if threading.current_thread().name.split("_")[0] != "cryoves-tensorflow":
        raise RuntimeError("cryoves: models are loaded and used in the TensorFlow thread only")
    from cryoves._tf import import_tensorflow

    import_tensorflow()
    from cryoves import model as _model

    return _model.get_model(path)


def describe_weights(path: str | None) -> tuple[float | None, str]:
    """Training voxel size and a one-line description of the weights at ``path`` (no TensorFlow),
    from :func:`cryoves.model.describe_weights`.

    Parameters
    ----------
    path : str or None
        Weights file or folder (``None``: the default weights shipped with cryoves).

    Returns
    -------
    voxel_size_nm : float or None
        None if the weights cannot be used (the description says why, in one line).
    description : str
    """
    from cryoves import model as _model

    try:
        info = _model.describe_weights(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        text = str(exc).strip()
        return None, (text.splitlines()[0] if text else type(exc).__name__)
    return float(info["voxel_size_nm"]), info["summary"]
