"""The one place where cryoves imports TensorFlow and Keras.

TensorFlow >= 2.19 loads its bundled LLVM with ``RTLD_GLOBAL``; in a process that also
uses Mesa's OpenGL (napari's canvas) the two LLVMs clash and the process segfaults,
whichever is imported first. :func:`import_tensorflow` loads TensorFlow with
``RTLD_LOCAL | RTLD_DEEPBIND`` and keeps it from switching to ``RTLD_GLOBAL``
(its ``pywrap_dlopen_global_flags`` module is replaced by a no-op for the import).

Every module of cryoves that needs TensorFlow or Keras calls :func:`import_tensorflow`
or :func:`import_keras` (lazily, inside functions), never ``import tensorflow`` at
module level, so ``import cryoves`` stays fast and TensorFlow-free.
"""

from __future__ import annotations

import os
import sys
import types

__all__ = ["import_tensorflow", "import_keras"]

_FLAGS_MODULE = "tensorflow.python.pywrap_dlopen_global_flags"


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
    try:
        import tensorflow as tf
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "cryoves needs TensorFlow for the U-Net (pip install tensorflow-cpu, or "
            "cryoves[gpu] for CUDA): " + str(err)) from err
    finally:
        if has_flags:
            sys.setdlopenflags(old_flags)
            if saved_module is None:
                sys.modules.pop(_FLAGS_MODULE, None)
            else:  # pragma: no cover
                sys.modules[_FLAGS_MODULE] = saved_module
    return tf


def import_keras():
    """Import and return ``keras`` (Keras 3) on top of a safely imported TensorFlow.

    If ``KERAS_BACKEND`` names another backend (e.g. ``torch`` for training on a GPU
    machine without TensorFlow), TensorFlow is not imported.
    """
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        import_tensorflow()
    import keras

    return keras
