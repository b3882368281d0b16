"""cryoves.export: formats -> files, the Pyto rule, results written as one set."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cryoves import VesicleTable
from cryoves import export
from cryoves import io as cio

SHAPE = (40, 60, 60)
VS = 2.0
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _table(n=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(12, 28, size=(n, 3)) + [0, 10, 10]
    return VesicleTable.from_arrays(centers, rng.uniform(6, 9, n), voxel_size=VS,
                                    thickness=[2.0] * n, density=[-0.5] * n, pvalue=[0.5] * n,
                                    stage=["refine"] * n, status=["accepted"] * n)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_output_names_match_docs():
    names = export.output_names("tomo", export.FORMATS, ("probability",))
    assert names == {"csv": "tomo_vesicles.csv", "labels": "tomo_labels.mrc", "pyto": "tomo_pyto.mrc",
                     "star": "tomo_vesicles.star", "mod": "tomo_vesicles.mod",
                     "probability": "tomo_probability.mrc", "record": "tomo_segment.json"}
    assert list(names)[-1] == "record"  # the record is the last file of a set
    doc = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    for n in names.values():
        assert n.replace("tomo", "TOMO") in doc, n
    with pytest.raises(ValueError, match="unknown format"):
        export.output_names("t", ("csv", "pdf"))


def test_pyto_rule():
    m = np.zeros((4, 4, 4), np.uint8)
    m[0] = 1
    m[1] = 2
    region, az = export.pyto_regions(m)
    assert region.sum() == 32 and az.sum() == 16
    m[2] = 5  # not a Pyto file: any non-zero is the region, no active zone
    region, az = export.pyto_regions(m)
    assert region.sum() == 48 and az is None
    assert export.pyto_regions(None) == (None, None)


def test_export_writes_a_complete_set(tmp_path):
    t = _table()
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :, :30] = 1
    mask[:2, :, :30] = 2
    out = export.export_results(tmp_path / "o", "tomo", t, shape=SHAPE, mask=mask,
                                record={"note": "x"})
    folder = tmp_path / "o"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in out.values())
    rec = json.loads(out["record"].read_text())
    assert rec["complete"] is True and rec["note"] == "x" and rec["n_accepted"] == 3
    assert rec["files"] == {p.name: p.stat().st_size for k, p in out.items() if k != "record"}
    state = export.result_state(folder, "tomo")
    assert state.complete and state.covers(export.output_names("tomo"))
    assert not state.covers(export.output_names("tomo", volumes=("probability",)))
    pyto, _ = cio.read_labels(out["pyto"])
    assert set(np.unique(pyto)) == {0, 1, 2, 10, 11, 12}
    assert cio.read_vesicles_csv(out["csv"]) == t
    assert not _hidden(folder)  # no staging folder, no temporary file


def test_export_writes_the_label_files_side_by_side(tmp_path, monkeypatch):
    # the labels and the Pyto file are written at the same time, on two threads: each waits
    # for the other at a barrier (written one after the other, the barrier times out)
    import threading

    from cryoves import _parallel

    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    barrier = threading.Barrier(2, timeout=20)
    threads = {}
    real = export.write_format

    def meeting(fmt, *a, **k):
        if fmt in ("labels", "pyto"):
            threads[fmt] = threading.get_ident()
            barrier.wait()
        return real(fmt, *a, **k)

    monkeypatch.setattr(export, "write_format", meeting)
    seen = []
    out = export.export_results(tmp_path / "o", "tomo", _table(), shape=SHAPE,
                                progress=lambda *a: seen.append(a[1:]))
    assert threads["labels"] != threads["pyto"] != threading.get_ident()
    assert export.result_state(tmp_path / "o", "tomo").complete
    lab, _ = cio.read_labels(out["labels"])
    pyto, _ = cio.read_labels(out["pyto"])
    assert set(np.unique(lab)) == {0, 1, 2, 3} and set(np.unique(pyto)) == {0, 10, 11, 12}
    n = len(out)
    assert seen == [(i, n) for i in range(n - 1)] + [(n, n)]  # in order, from the calling thread


def test_a_failed_file_stops_the_set_after_the_other_writers_end(tmp_path, monkeypatch):
    # the labels file fails while the Pyto file is being written on another thread: the error
    # is raised only once that writer has ended, and the staging folder is gone. (The labels
    # writer fails only once the Pyto writer has started: otherwise the Pyto file may never
    # start, its call cancelled, which is right too but not what this test is about.)
    import errno
    import threading
    import time

    from cryoves import _parallel

    monkeypatch.setattr(_parallel, "n_cores", lambda: 2)
    real = export.write_format
    pyto_started, pyto_done = threading.Event(), threading.Event()

    def failing(fmt, *a, **k):
        if fmt == "labels":
            assert pyto_started.wait(20)
            raise OSError(errno.ENOSPC, "No space left on device")
        if fmt == "pyto":
            pyto_started.set()
            time.sleep(1.0)
            out = real(fmt, *a, **k)
            pyto_done.set()
            return out
        return real(fmt, *a, **k)

    monkeypatch.setattr(export, "write_format", failing)
    folder = tmp_path / "o"
    with pytest.raises(OSError, match="No space left"):
        export.export_results(folder, "tomo", _table(), shape=SHAPE)
    assert pyto_done.is_set()
    assert list(folder.iterdir()) == []  # no file of the set, no staging folder


def test_complete_set_needs_overwrite_and_formats_never_mix(tmp_path):
    folder = tmp_path / "o"
    export.export_results(folder, "tomo", _table(), shape=SHAPE)
    before = _hashes(folder)
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_results(folder, "tomo", _table(5, seed=1), shape=SHAPE, formats=("csv",))
    assert _hashes(folder) == before
    export.export_results(folder, "tomo", _table(5, seed=1), shape=SHAPE, formats=("csv",), overwrite=True)
    # the files of the old set that the new one lacks are gone: no mixed results
    assert sorted(p.name for p in folder.iterdir()) == ["tomo_segment.json", "tomo_vesicles.csv"]
    assert len(cio.read_vesicles_csv(folder / "tomo_vesicles.csv")) == 5


def test_incomplete_set_is_recognised_and_redone(tmp_path):
    folder = tmp_path / "o"
    export.export_results(folder, "tomo", _table(), shape=SHAPE)
    (folder / "tomo_segment.json").unlink()  # as after a kill between the moves
    state = export.result_state(folder, "tomo")
    assert state.status == "incomplete" and "no run record" in state.reason
    export.export_results(folder, "tomo", _table(4, seed=2), shape=SHAPE)  # no overwrite needed
    assert export.result_state(folder, "tomo").complete
    # a file of another size than the record says is incomplete too
    with open(folder / "tomo_vesicles.csv", "a") as fh:
        fh.write("\n")
    state = export.result_state(folder, "tomo")
    assert state.status == "incomplete" and "bytes" in state.reason
    export.export_results(folder, "tomo", _table(4, seed=2), shape=SHAPE)
    (folder / "tomo_labels.mrc").unlink()
    assert "missing" in export.result_state(folder, "tomo").reason


def test_protected_input_is_never_replaced(tmp_path):
    folder = tmp_path / "o"
    folder.mkdir()
    victim = folder / "tomo_labels.mrc"
    cio.write_labels_mrc(victim, np.zeros(SHAPE, np.uint16), VS)
    cio.read_tomogram(victim, check=False)  # protects it, as an input of this run
    before = victim.read_bytes()
    with pytest.raises(PermissionError, match="input file"):
        export.export_results(folder, "tomo", _table(), shape=SHAPE, overwrite=True)
    assert victim.read_bytes() == before and not _hidden(folder)
    # nor removed as a file of an earlier set that the new one lacks
    other = tmp_path / "o2"
    export.export_results(other, "tomo", _table(), shape=SHAPE, formats=("csv", "pyto"))
    cio.read_tomogram(other / "tomo_pyto.mrc", check=False)  # e.g. given as --mask
    before = other.joinpath("tomo_pyto.mrc").read_bytes()
    with pytest.raises(PermissionError, match="tomo_pyto.mrc is an input file"):
        export.export_results(other, "tomo", _table(), shape=SHAPE, formats=("csv",), overwrite=True)
    assert other.joinpath("tomo_pyto.mrc").read_bytes() == before and not _hidden(other)


_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from cryoves import VesicleTable, export
    rng = np.random.default_rng(5)
    t = VesicleTable.from_arrays(rng.uniform(12, 28, size=(7, 3)), rng.uniform(6, 9, 7), voxel_size=2.0)
    try:
        export.export_results(sys.argv[1], "tomo", t, shape=(40, 60, 60), overwrite=True)
    except OSError as err:
        print(err, file=sys.stderr)
        sys.exit(3)
""")


def _run_export(folder, *, fsize=None, fault=None):
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop(export._FAULT_ENV, None)
    if fault:
        env[export._FAULT_ENV] = fault

    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-c", _SCRIPT, str(folder)], env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=120)


def test_write_failure_during_overwrite_keeps_the_previous_set(tmp_path):
    folder = tmp_path / "o"
    export.export_results(folder, "tomo", _table(), shape=SHAPE)
    before = _hashes(folder)
    r = _run_export(folder, fsize=100_000)  # the labels file (288 kB) cannot be written
    assert r.returncode == 3, r.stderr
    assert "File too large" in r.stderr and str(folder / "tomo_labels.mrc") in r.stderr
    assert "previous results are unchanged" in r.stderr
    assert _hashes(folder) == before and not _hidden(folder)
    assert export.result_state(folder, "tomo").complete


def test_kill_while_staging_leaves_the_previous_set_and_the_staging_is_removed_later(tmp_path):
    folder = tmp_path / "o"
    export.export_results(folder, "tomo", _table(), shape=SHAPE)
    before = _hashes(folder)
    r = _run_export(folder, fault="kill:labels")
    assert r.returncode == -9
    assert _hashes(folder) == before and export.result_state(folder, "tomo").complete
    stale = _hidden(folder)
    assert len(stale) == 1 and stale[0].startswith(export.STAGING_PREFIX)
    assert export.remove_stale_staging(folder) == [folder / stale[0]]
    assert not _hidden(folder)


def test_kill_during_commit_is_an_incomplete_set_never_a_finished_one(tmp_path):
    folder = tmp_path / "o"
    export.export_results(folder, "tomo", _table(), shape=SHAPE)
    r = _run_export(folder, fault="kill-commit:labels")
    assert r.returncode == -9
    state = export.result_state(folder, "tomo")
    assert state.status == "incomplete"  # new CSV and labels, old STAR: never passes as finished
    export.export_results(folder, "tomo", _table(2, seed=9), shape=SHAPE)  # redone without overwrite
    assert export.result_state(folder, "tomo").complete and not _hidden(folder)
    assert len(cio.read_star(folder / "tomo_vesicles.star")) == 2


def test_write_format_single_files(tmp_path):
    t = _table()
    p = export.write_format("mod", tmp_path / "a.mod", t, shape=SHAPE)
    assert len(cio.read_imod_model(p)) == 3
    lab = np.zeros(SHAPE, np.uint16)
    lab[1, 2, 3] = 4
    p = export.write_format("labels", tmp_path / "l.mrc", None, labels=lab, voxel_size=VS)
    np.testing.assert_array_equal(cio.read_labels(p)[0], lab)
    with pytest.raises(ValueError, match="shape"):
        export.write_format("pyto", tmp_path / "p.mrc", t)
    with pytest.raises(ValueError, match="needs a vesicle table"):
        export.write_format("csv", tmp_path / "c.csv", None)
