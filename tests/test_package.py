"""The core is headless: it imports and runs without napari, Qt or TensorFlow loaded."""

import json
import subprocess
import sys

import pytest

CORE_MODULES = ["cryoves", "cryoves.table", "cryoves.evaluate", "cryoves.io", "cryoves.simulate",
                "cryoves.threshold", "cryoves.refine", "cryoves.outliers", "cryoves.pipeline",
                "cryoves.model", "cryoves.predict", "cryoves.cli"]


def test_core_imports_without_napari_qt_or_tensorflow():
    code = f"""
import importlib, json, sys
class Block:
    # make napari and every Qt binding unimportable in this process
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'magicgui', 'vispy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
done = []
for m in {CORE_MODULES!r}:
    importlib.import_module(m)  # any ImportError fails the test
    done.append(m)
heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'napari', 'PyQt5', 'PyQt6',
                                                          'PySide2', 'PySide6', 'qtpy', 'magicgui', 'vispy'))
print(json.dumps({{"done": done, "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["done"] == CORE_MODULES
    assert res["heavy"] == [], f"importing the core pulled in {res['heavy'][:5]}"


def test_shipped_files_are_found():
    from cryoves import _resources

    manifest = _resources.manifest_path()
    assert manifest.is_file() and "cryoves" in manifest.read_text()
    assert _resources.sample_data_dir().is_dir()
    assert _resources.weights_dir().is_dir()


def test_cli_help_is_instant_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cryoves", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "COMMAND" in out.stdout


def test_wheel_install_ships_manifest_sample_data_and_weights(tmp_path):
    """`pip install .` (a wheel, not editable) must carry napari.yaml, sample_data/ and weights/."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(root)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("cryoves-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("cryoves/napari.yaml", "cryoves/_sample_data/tomogram.mrc",
                   "cryoves/_sample_data/vesicles_truth.csv", "cryoves/_weights/cryoves_default.weights.h5",
                   "cryoves/_weights/cryoves_default.json"):
        assert needed in names, f"{needed} missing from the wheel"
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("import cryoves, cryoves._resources as r, json;"
            "print(json.dumps([cryoves.__file__, str(r.manifest_path()), str(r.sample_data_dir()),"
            " str(r.weights_dir())]))")
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    paths = json.loads(out.stdout.strip().splitlines()[-1])
    for p in paths:
        assert p.startswith(str(target)), f"{p} does not come from the installed wheel"
    assert Path(paths[2], "tomogram.mrc").stat().st_size > 1_000_000  # real files, not links
    assert not Path(paths[3], "cryoves_default.weights.h5").is_symlink()


def test_tensorflow_import_is_quiet():
    """No absl/oneDNN start-up lines from TensorFlow's native libraries on stderr."""
    code = ("from cryoves._tf import import_tensorflow; tf = import_tensorflow();"
            "print(tf.reduce_sum(tf.ones((2, 2))).numpy())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("4.0")
    for chatter in ("oneDNN", "absl::InitializeLog", "cpu_feature_guard"):
        assert chatter not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("gc_on", [True, False])
def test_tensorflow_import_leaves_garbage_collection_as_it_was(gc_on):
    """The import runs without cyclic collections (six full ones cost 0.5-0.6 s of start-up),
    then makes one full collection; the collector is on afterwards only if it was on before."""
    code = ("import gc\n"
            + ("" if gc_on else "gc.disable()\n")
            + "before = gc.get_stats()[2]['collections']\n"
            "from cryoves._tf import import_tensorflow\nimport_tensorflow()\n"
            "print(gc.isenabled(), gc.get_stats()[2]['collections'] - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    enabled, full = out.stdout.split()
    assert enabled == str(gc_on)
    assert int(full) == (1 if gc_on else 0)


def test_command_entry_point_writes_everything_and_returns_the_status(tmp_path):
    """``cryoves`` (console script and ``python -m cryoves``) is ``cryoves.cli.run``: main, flushed
    streams, then ``os._exit`` with main's status (no interpreter teardown)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["cryoves"] == "cryoves.cli:run"
    out_dir = tmp_path / "sim"
    # stdout to a pipe (block-buffered): its last line must still arrive
    ok = subprocess.run([sys.executable, "-m", "cryoves", "simulate", str(out_dir), "--shape", "16", "32", "32",
                         "--n-vesicles", "1"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().splitlines()[-1].startswith("simulated (16, 32, 32)")
    assert {p.name for p in out_dir.iterdir()} >= {"tomogram.mrc", "labels.mrc", "vesicles.csv", "params.json"}
    # an error: status 2 and the message, through the same exit
    bad = subprocess.run([sys.executable, "-m", "cryoves", "segment", str(tmp_path / "missing.mrc"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "missing.mrc" in bad.stderr and "error" in bad.stderr
    # the exit skips atexit handlers: run() itself must have flushed what a caller printed before
    code = ("import atexit, sys\nfrom cryoves.cli import run\n"
            "atexit.register(lambda: print('teardown ran'))\nsys.stdout.write('before')\nrun(['--version'])")
    ver = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ver.returncode == 0 and "cryoves" in ver.stdout  # --version: SystemExit, the normal way
    code = ("import atexit, sys\nfrom cryoves.cli import run\n"
            "atexit.register(lambda: print('teardown ran'))\nsys.stdout.write('before;')\n"
            f"run(['simulate', {str(tmp_path / 'sim2')!r}, '--shape', '16', '32', '32', '--quiet'])")
    quick = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quick.returncode == 0, quick.stderr[-2000:]
    assert quick.stdout.startswith("before;") and "teardown ran" not in quick.stdout


def test_train_help_shows_defaults_and_run_time():
    out = subprocess.run([sys.executable, "-m", "cryoves", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for default in ("(default: 30)", "(default: 100)", "(default: 4)", "(default: 48)", "(default: 0.001)",
                    "(default: 0)"):
        assert default in text, default
    assert "75 min on 2 CPU cores" in text
    assert "(default: None)" not in text and "(default: [])" not in text


def test_console_progress_prints_lines_when_not_a_terminal():
    import io

    from cryoves._progress import ConsoleProgress

    stream = io.StringIO()  # not a terminal
    with ConsoleProgress(stream, interval=0, labels={"train": "training"}) as progress:
        for i in range(1001):
            progress("train", i, 1000)
        progress("simulate", 1, 2)
    lines = stream.getvalue().splitlines()
    train = [line for line in lines if line.startswith("training: ")]
    assert 10 <= len(train) <= 11, lines  # one per 10 %, not one per report
    assert train[-1].startswith("training: 1000/1000 (100%)")
    assert lines[-1].startswith("simulate: 1/2 (50%)")
    assert "\r" not in stream.getvalue()  # no terminal bar codes in a log
