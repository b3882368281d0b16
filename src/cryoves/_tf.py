"""The one place where cryoves imports TensorFlow and Keras.

TensorFlow >= 2.19 loads its bundled LLVM with ``RTLD_GLOBAL``; in a process that also
uses Mesa's OpenGL (napari's canvas) the two LLVMs clash and the process segfaults,
whichever is imported first. :func:`import_tensorflow` loads TensorFlow with
``RTLD_LOCAL | RTLD_DEEPBIND`` and keeps it from switching to ``RTLD_GLOBAL``
(its ``pywrap_dlopen_global_flags`` module is replaced by a no-op for the import).

Every module of cryoves that needs TensorFlow or Keras calls :func:`import_tensorflow`
or :func:`import_keras` (lazily, inside functions), never ``import tensorflow`` at
module level, so ``import cryoves`` stays fast and TensorFlow-free.

The import is quiet: ``TF_CPP_MIN_LOG_LEVEL`` is set before it, and the lines TensorFlow's
native libraries write straight to the stderr file descriptor while they load, before their
logging is configured (the absl "All log messages before absl::InitializeLog()" warning and
the oneDNN notice, once per library, i.e. twice), are filtered out; any other output of the
import still reaches stderr. Python-side absl logging is limited to errors.

The import is also shorter: Keras imports ``matplotlib.pyplot`` (about 0.5 s of the ~3 s) only
for its image-gallery plotting helpers, which cryoves never calls, and takes its absence
quietly; :func:`import_tensorflow` and :func:`import_keras` keep matplotlib from being imported
by their own thread while they import (:class:`_NoMatplotlib`; other threads, and a matplotlib
already imported, are not affected).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
import threading
import types

__all__ = ["import_tensorflow", "import_keras", "compute_device"]

_FLAGS_MODULE = "tensorflow.python.pywrap_dlopen_global_flags"

#: Start-up lines of TensorFlow's native libraries that say nothing to a user.
_CHATTER = re.compile(r"All log messages before absl::InitializeLog\(\)|oneDNN custom operations are on"
                      r"|cpu_feature_guard|rebuild TensorFlow with the appropriate compiler flags"
                      r"|^To enable the following instructions")


class _NoMatplotlib:
    """An import hook that makes ``import matplotlib...`` fail in one thread (not yet imported modules only).

    Installed by :func:`_without_matplotlib` for the import of TensorFlow and Keras, whose only
    use of it is an optional ``try: import matplotlib.pyplot ... except ImportError``.
    """

    def __init__(self, thread: int):
        self.thread = thread

    def find_spec(self, name, path=None, target=None):
        if (name == "matplotlib" or name.startswith("matplotlib.")) and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"{name} is not imported while cryoves imports TensorFlow", name=name)
        return None


@contextlib.contextmanager
def _without_matplotlib():
    """Keep the calling thread from importing matplotlib (modules not yet imported) inside the block."""
    hook = _NoMatplotlib(threading.get_ident())
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(hook)


@contextlib.contextmanager
def _filtered_native_stderr():
    """Route the stderr file descriptor to a file meanwhile; re-emit all but :data:`_CHATTER` lines."""
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):  # no real stderr (e.g. some GUI launchers)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        for stream in (sys.stderr, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.__stderr__.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            keep = [line for line in text.splitlines() if line.strip() and not _CHATTER.search(line)]
            if keep:
                sys.stderr.write("\n".join(keep) + "\n")


def import_tensorflow():
    """Import and return the ``tensorflow`` module with safe dlopen flags (idempotent)."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "__version__"):
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no oneDNN/cpu-feature chatter
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    has_flags = hasattr(sys, "getdlopenflags") and hasattr(os, "RTLD_DEEPBIND")
    saved_module = sys.modules.get(_FLAGS_MODULE)
    if has_flags:
        old_flags = sys.getdlopenflags()
        stub = types.ModuleType(_FLAGS_MODULE)
        stub.set_dlopen_flags = lambda: None
        stub.reset_dlopen_flags = lambda: None
        sys.modules[_FLAGS_MODULE] = stub
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    # no cyclic garbage collection during the import: it creates ~350,000 long-lived objects, and
    # the six full collections they triggered took 0.5-0.6 s of the command's start-up (measured).
    # One full collection afterwards (~0.25 s) puts them in the oldest generation and sets the
    # count that spaces the next full ones (without it, one came during the post-processing).
    # Not gc.freeze: a napari session's layers would be frozen with them, never collected
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        with _filtered_native_stderr(), _without_matplotlib():
            import tensorflow as tf
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "cryoves needs TensorFlow for the U-Net (pip install tensorflow-cpu, or "
            "cryoves[gpu] for CUDA): " + str(err)) from err
    finally:
        if gc_was_on:
            gc.enable()
            gc.collect()
        if has_flags:
            sys.setdlopenflags(old_flags)
            if saved_module is None:
                sys.modules.pop(_FLAGS_MODULE, None)
            else:  # pragma: no cover
                sys.modules[_FLAGS_MODULE] = saved_module
    with contextlib.suppress(Exception):  # absl's Python logging: errors only
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    return tf


def import_keras():
    """Import and return ``keras`` (Keras 3) on top of a safely imported TensorFlow.

    If ``KERAS_BACKEND`` names another backend (e.g. ``torch`` for training on a GPU
    machine without TensorFlow), TensorFlow is not imported.
    """
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        import_tensorflow()
    with _without_matplotlib():
        import keras

    return keras


def compute_device() -> str:
    """Where TensorFlow runs the U-Net: ``"GPU:0 (<name>)"`` when it sees a GPU, else ``"CPU (<n> cores)"``.

    TensorFlow places the network on the first visible GPU by default; cryoves does not change
    that. Imports TensorFlow. Recorded in the run record of ``cryoves segment`` and in the notes
    of a trained model's card.
    """
    tf = import_tensorflow()
    try:
        gpus = tf.config.list_physical_devices("GPU")
    except Exception:  # pragma: no cover - a broken CUDA set-up: TensorFlow falls back to the CPU
        gpus = []
    if gpus:  # pragma: no cover - no GPU on the test machines
        name = ""
        with contextlib.suppress(Exception):
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
        return f"GPU:0 ({name})" if name else "GPU:0"
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return f"CPU ({n} cores)"
