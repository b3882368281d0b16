"""Shared fixtures: small simulated tomograms (session-scoped), MRC files, an unwritable folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# The napari tests run with the Qt binding that cryoves[napari] installs (Qt6) even where an
# older PyQt5 is still installed beside it (qtpy would pick PyQt5 first).
if "QT_API" not in os.environ:
    import importlib.util

    if importlib.util.find_spec("PyQt6") is not None:
        os.environ["QT_API"] = "pyqt6"

# The tests compare predictions with tight tolerances, in float32 (on a CPU with native bfloat16
# cryoves predicts in bfloat16 by default); tests/test_precision.py covers bfloat16.
os.environ.setdefault("CRYOVES_PRECISION", "float32")

#: Shape and voxel size of the small simulated tomogram used by plumbing tests.
SMALL_SHAPE = (48, 96, 96)
SMALL_VOXEL_NM = 2.2


def _can_write(folder: Path) -> bool:
    try:
        fd, p = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(p)
    return True


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder in which no file can be created (chmod 500; as root, /sys)."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    try:
        if not _can_write(d):
            yield d
        elif Path("/sys").is_dir() and not _can_write(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("cannot make an unwritable folder here (root without a read-only /sys)")
    finally:
        d.chmod(0o700)


@pytest.fixture(scope="session")
def small_simulation():
    """A small simulated tomogram with ground truth (cryoves.simulate), made once per session."""
    from cryoves import simulate

    return simulate.simulate_tomogram(SMALL_SHAPE, SMALL_VOXEL_NM, seed=7)


@pytest.fixture(scope="session")
def small_tomogram_file(tmp_path_factory, small_simulation):
    """The small simulated tomogram written as float32 MRC (voxel size in the header)."""
    import mrcfile

    path = tmp_path_factory.mktemp("sim") / "sim_tomo.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.asarray(small_simulation.tomogram, dtype=np.float32))
        m.voxel_size = small_simulation.voxel_size * 10.0
    return path


@pytest.fixture
def tomo(tmp_path, small_tomogram_file):
    """A private copy of the small simulated tomogram in ``tmp_path/in`` (tests may look at its
    bytes and mtime, or write results beside it)."""
    import shutil

    p = tmp_path / "in" / "tomo.mrc"
    p.parent.mkdir()
    shutil.copy(small_tomogram_file, p)
    return p


def oracle_probability_map(table, shape) -> np.ndarray:
    """What a well-trained network would output for the vesicles of ``table``.

    1 at each centre, falling to 0.8 at the outer radius (``1 - 0.2 (d/r)^6``, so the
    membrane lies inside the paper's threshold range 0.8-1.0 and touching vesicles are
    separated by a dip), then a Gaussian fall-off of one voxel outside.
    """
    p = np.zeros(tuple(shape), np.float32)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for c, r in zip(table.centers, table.radii):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        v = np.where(d <= r, 1.0 - 0.2 * (d / r) ** 6, 0.8 * np.exp(-0.5 * (d - r) ** 2))
        np.maximum(p, v.astype(np.float32), out=p)
    return p


@pytest.fixture(scope="session")
def oracle_probability(small_simulation):
    """:func:`oracle_probability_map` of the small simulation's true vesicles.

    Lets the stages after prediction be tested for real without trained weights.
    """
    return oracle_probability_map(small_simulation.table, small_simulation.tomogram.shape)


@pytest.fixture(scope="session")
def random_model():
    """A small randomly initialised U-Net (plumbing tests only: its predictions are meaningless)."""
    from cryoves import model as model_mod

    return model_mod.new_model(name="random-test", voxel_size_nm=SMALL_VOXEL_NM, seed=0, n_filter_base=4)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory, random_model):
    """``random_model`` saved as cryoves weights (``NAME.weights.h5`` + ``NAME.json``)."""
    return random_model.save(tmp_path_factory.mktemp("weights") / "random-test")


#: The reference CryoVesNet weights (read-only, outside the repository; tests skip without them).
REFERENCE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"


@pytest.fixture(scope="session")
def reference_weights():
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip(f"reference CryoVesNet weights not found at {REFERENCE_WEIGHTS}")
    return REFERENCE_WEIGHTS


# --------------------------------------------------------------------------------------
# TensorFlow's and Qt/Mesa's native libraries can crash while the interpreter tears down
# (seen intermittently after every test had passed: "239 passed", then SIGSEGV, exit 139).
# After pytest has finished and reported, leave with pytest's own exit status instead of
# running that teardown. os._exit skips the atexit handlers, among them the one by which
# pytest-xvfb stops its Xvfb server, so that server is stopped here first.
# CRYOVES_TEST_HARD_EXIT=0 restores the normal interpreter exit.
# --------------------------------------------------------------------------------------
_SESSION = {}


def pytest_sessionfinish(session, exitstatus):
    _SESSION["status"] = int(exitstatus)


def _stop_virtual_display() -> None:
    """Stop the Xvfb server that pytest-xvfb started for this run (if any)."""
    import sys

    plugin = sys.modules.get("pytest_xvfb")
    if plugin is not None and getattr(plugin, "xvfb_instance", None) is not None:
        plugin.shutdown_xvfb()
        plugin.xvfb_instance = None


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import sys

    if "status" not in _SESSION or os.environ.get("CRYOVES_TEST_HARD_EXIT", "1") != "1":
        return
    if "tensorflow" not in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _stop_virtual_display()
    os._exit(_SESSION["status"])
