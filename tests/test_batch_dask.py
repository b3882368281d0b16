"""``cryoves segment A B C --workers N / --scheduler ADDRESS``: tomograms on a dask cluster.

Every cluster here is a LocalCluster of 2 single-threaded worker processes on 127.0.0.1, closed
by the end of its test. Three tiny simulated tomograms (48x64x64 at 2.2 nm, 6-8 vesicles each,
found by the default weights shipped with cryoves) keep each run to seconds of work; the rest is
starting the workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cryoves.cli import main

pytest.importorskip("distributed")

SHAPE = (48, 64, 64)
VOXEL_NM = 2.2
STEMS = ("a", "b", "c")
FORMATS = "csv,labels,star"


@pytest.fixture(scope="module")
def tomos(tmp_path_factory):
    from cryoves import io as cio
    from cryoves.simulate import simulate_tomogram

    folder = tmp_path_factory.mktemp("dask_in")
    paths = []
    for seed, stem in enumerate(STEMS, start=1):
        sim = simulate_tomogram(SHAPE, VOXEL_NM, seed=seed)
        paths.append(cio.write_mrc(folder / f"{stem}.mrc", sim.tomogram, VOXEL_NM))
    return paths


@pytest.fixture(scope="module")
def sequential(tomos, tmp_path_factory):
    """The same batch run one tomogram after the other in this process (the reference)."""
    out = tmp_path_factory.mktemp("dask_seq") / "out"
    rc = main(["segment", *map(str, tomos), "--out", str(out), "--quiet",
               "--formats", FORMATS])
    assert rc == 0
    assert all(_tables(out)[s].count("\n") > 1 for s in STEMS)  # some vesicle rows to compare
    return out


def _tables(out: Path) -> dict:
    return {s: (out / s / f"{s}_vesicles.csv").read_text() for s in STEMS}


def _labels(out: Path, stem: str) -> np.ndarray:
    import mrcfile

    return mrcfile.read(out / stem / f"{stem}_labels.mrc")


def _summary(stdout: str) -> list:
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tomogram") and "status" in ln)
    return [ln.split()[:2] for ln in lines[head + 1:] if ln.split() and ln.split()[0].endswith(".mrc")]


def _hidden(out: Path) -> list:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def _complete(out: Path, stem: str) -> bool:
    from cryoves.export import output_names, result_state

    names = output_names(stem, FORMATS.split(","))
    return result_state(out / stem, stem, names).covers(names)


def _local_cluster():
    import logging

    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None, silence_logs=logging.ERROR)


def test_workers_give_the_sequential_results(tomos, sequential, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", *map(str, tomos), "--out", str(out),
               "--formats", FORMATS, "--workers", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "local dask cluster of 2 worker" in cap.err
    assert _summary(cap.out) == [[f"{s}.mrc", "done"] for s in STEMS]
    assert _tables(out) == _tables(sequential)
    for s in STEMS:
        assert np.array_equal(_labels(out, s), _labels(sequential, s))
        assert _complete(out, s)
    assert not _hidden(out)


def test_a_worker_killed_mid_batch_loses_nothing(tomos, sequential, tmp_path, capsys,
                                                 monkeypatch):
    """The worker running b dies after the first file of b's set is in place (an incomplete set)."""
    from cryoves.batch import _TEST_KILL_ENV

    marker = tmp_path / "killed"
    monkeypatch.setenv(_TEST_KILL_ENV, f"b:{marker}")  # inherited by the worker processes
    out = tmp_path / "out"
    rc = main(["segment", *map(str, tomos), "--out", str(out), "--quiet",
               "--formats", FORMATS, "--workers", "2"])
    cap = capsys.readouterr()
    assert marker.exists(), "the worker was not killed"
    assert int(marker.read_text()) > 0
    assert rc == 0, cap.err
    assert _summary(cap.out) == [[f"{s}.mrc", "done"] for s in STEMS]
    for s in STEMS:
        assert _complete(out, s), s
    assert _tables(out) == _tables(sequential)
    assert not _hidden(out)  # the dead worker's staging folder is gone too


def test_scheduler_address_resume_and_a_failing_tomogram(tomos, sequential, tmp_path, capsys):
    import shutil

    from distributed import Client

    from cryoves import io as cio

    bad = tmp_path / "in" / "d.mrc"  # a valid header, but NaN data: fails on the worker
    data = cio.read_tomogram(tomos[0])[0].copy()
    data[3, 4, 5] = np.nan
    bad.parent.mkdir()
    cio.write_mrc(bad, data, VOXEL_NM)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(sequential / "a", out / "a")  # finished earlier: skipped
    with _local_cluster() as cluster, Client(cluster) as client:
        rc = main(["segment", *map(str, tomos), str(bad), "--out", str(out),
                   "--formats", FORMATS, "--scheduler", cluster.scheduler_address])
        cap = capsys.readouterr()
        # one model per worker process, loaded once and kept
        models = client.run(lambda: len(__import__("cryoves.model", fromlist=["_CACHE"])._CACHE)
                            if "cryoves.model" in sys.modules else 0)
        assert len(client.scheduler_info()["workers"]) == 2  # the cluster is left running
    assert rc == 1
    assert _summary(cap.out) == [["a.mrc", "skipped"], ["b.mrc", "done"], ["c.mrc", "done"], ["d.mrc", "FAILED"]]
    assert "d.mrc" in cap.err and "NaN" in cap.err
    assert sorted(models.values()) in ([0, 1], [1, 1])
    assert _tables(out) == _tables(sequential)
    assert not (out / "d").exists()


def test_cluster_options_are_checked_first(tomos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["segment", *map(str, tomos), "--out", str(out)]
    cases = [(["--workers", "0"], "--workers must be at least 1"),
             (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both")]
    for extra, part in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert part in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    assert main(base + ["--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "cryoves[dask]"' in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
