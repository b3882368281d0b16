"""A corpus of bad inputs and faults, through the command line, the API and the result checks.

For each case: the message (one line, naming the file or option), the exit status, the input
unchanged (hash), and no partial or mixed results (no empty ``--out`` folder either).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoves import io as cio
from cryoves import validate
from cryoves.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAULT_ENV = "CRYOVES_TEST_EXPORT_FAULT"


def _sha(path: Path) -> str:
    if path.is_dir():
        return "folder"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")]


def _mrc(path: Path, data, vs=2.2):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data))
        if vs:
            m.voxel_size = vs * 10
    return path


def _case(name, d: Path, tomo: Path):
    """(input path, extra arguments, expected message parts) for a bad-input case."""
    good = mrcfile.read(tomo).astype(np.float32)
    if name == "folder":
        p = d / "dir.mrc"
        p.mkdir()
        return p, [], ["dir.mrc is a folder"]
    if name == "missing":
        return d / "nope.mrc", [], ["not found", "nope.mrc"]
    if name == "text":
        p = d / "notes.mrc"
        p.write_text("this is not a tomogram\n" * 80)
        return p, [], ["notes.mrc is not a readable MRC file"]
    if name == "png":
        p = d / "picture.mrc"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
        return p, [], ["picture.mrc is not a readable MRC file"]
    if name == "empty":
        p = d / "empty.mrc"
        p.write_bytes(b"")
        return p, [], ["empty.mrc", "empty"]
    if name == "truncated":
        p = d / "cut.mrc"
        p.write_bytes(tomo.read_bytes()[:50_000])
        return p, [], ["cut.mrc is truncated"]
    if name == "2d":
        return _mrc(d / "flat.mrc", good[0]), [], ["flat.mrc", "2-D"]
    if name == "nan":
        bad = good.copy()
        bad[5, 3, 3] = np.nan
        return _mrc(d / "holes.mrc", bad), [], ["holes.mrc", "NaN", "Z slice 5"]
    if name == "constant":
        return _mrc(d / "flatval.mrc", np.ones_like(good)), [], ["flatval.mrc", "same value"]
    if name == "thin":
        return _mrc(d / "thin.mrc", good[:4]), [], ["thin.mrc", "4 voxels", "thinner than the smallest vesicle"]
    if name == "no-voxel-size":
        return _mrc(d / "novs.mrc", good, vs=None), [], ["novs.mrc", "no voxel size", "--voxel-size"]
    if name == "voxel-inf":
        return tomo, ["--voxel-size", "inf"], ["--voxel-size must be a positive, finite number", "infinite"]
    if name == "voxel-nan":
        return tomo, ["--voxel-size", "nan"], ["--voxel-size", "not a number"]
    if name == "voxel-angstrom":
        return tomo, ["--voxel-size", "22"], ["--voxel-size=22 nm is implausible", "Did you give Å? 22 Å = 2.2 nm"]
    raise AssertionError(name)


CLI_CASES = ["folder", "missing", "text", "png", "empty", "truncated", "2d", "nan", "constant", "thin",
             "no-voxel-size", "voxel-inf", "voxel-nan", "voxel-angstrom"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(case, tmp_path, tomo, capsys, monkeypatch):
    import cryoves.cli.segment as seg

    monkeypatch.setattr(seg, "_load_model", lambda w: pytest.fail("a bad input must be refused before the model"))
    path, extra, parts = _case(case, tmp_path / "in", tomo)
    before = _sha(path)
    out = tmp_path / "res" / "out"
    rc = main(["segment", str(path), "--out", str(out), "--quiet"] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert _sha(path) == before  # the input is untouched
    assert not (tmp_path / "res").exists()  # no empty --out folder (nor its parent) left behind


def test_cli_batch_names_each_failure_in_a_summary(tmp_path, tomo, random_weights, capsys):
    bad_dir = tmp_path / "in" / "dir.mrc"
    bad_dir.mkdir()
    thin = _case("thin", tmp_path / "in", tomo)[0]
    out = tmp_path / "out"
    rc = main(["segment", str(bad_dir), str(tomo), str(thin), "--out", str(out), "--weights", str(random_weights),
               "--quiet", "--formats", "csv"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "dir.mrc is a folder" in cap.err and "thinner than the smallest vesicle" in cap.err
    lines = cap.out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tomogram") and "status" in ln)
    table = lines[head + 1: head + 4]
    assert [ln.split()[:2] for ln in table] == [["dir.mrc", "FAILED"], ["tomo.mrc", "done"], ["thin.mrc", "FAILED"]]
    assert sorted(p.name for p in out.iterdir()) == ["tomo"]  # no folder for the failed ones


def test_cli_first_line_and_bad_input_come_before_heavy_imports(tmp_path, tomo):
    """A bad input is reported without importing TensorFlow (measured: well under 2 s)."""
    bad = tmp_path / "in" / "holes.mrc"
    data = mrcfile.read(tomo).astype(np.float32)
    data[7] = np.inf
    _mrc(bad, data)
    code = ("import sys, time; t0 = time.perf_counter(); from cryoves.cli import main; "
            f"rc = main(['segment', {str(bad)!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'tensorflow' in sys.modules, round(time.perf_counter() - t0, 2))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
                       text=True, timeout=120)
    rc, tf_loaded, _seconds = r.stdout.split()
    assert rc == "2" and tf_loaded == "False", r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "cryoves segment: checking 1 tomogram(s)"
    assert "holes.mrc" in lines[-1] and "NaN" in lines[-1]


def test_help_shows_every_default(capsys):
    from dataclasses import fields

    from cryoves.cli.segment import HELP_DEFAULTS
    from cryoves.pipeline import SegmentParams

    defaults = {f.name: f.default for f in fields(SegmentParams)}
    assert {k: defaults[k] for k in HELP_DEFAULTS} == HELP_DEFAULTS
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1]
    import re

    entries = [e for e in re.split(r"\n  (?=-)", options) if e.strip()]
    assert len(entries) == 16  # + --workers, --scheduler, --no-large-pass
    for entry in entries:
        flag = entry.strip().split()[0]
        if flag in ("-h,", "--out", "-o"):
            continue
        assert "default" in " ".join(entry.split()), entry


def test_cli_bad_weights_are_one_line(tmp_path, tomo, random_weights, capsys):
    from cryoves.model import new_model

    w = Path(random_weights)
    card = w.with_name(w.name[: -len(".weights.h5")] + ".json")
    d = tmp_path / "w"
    d.mkdir()
    (d / "text.weights.h5").write_text("not weights")
    (d / "cut.weights.h5").write_bytes(w.read_bytes()[:4000])
    new_model(name="wide", voxel_size_nm=2.2, seed=0, n_filter_base=8).save(d / "other")
    for name in ("text", "cut", "other"):
        shutil.copy(card, d / f"{name}.json")  # the small model's card next to each file
    expect = {"text": "is not a valid HDF5 weights file", "cut": "is not a valid HDF5 weights file (truncated",
              "other": "do not fit the architecture in its card"}
    for name, part in expect.items():
        weights = d / f"{name}.weights.h5"
        before = _sha(weights)
        rc = main(["segment", str(tomo), "--out", str(tmp_path / "o"), "--weights", str(weights), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and part in err[0] and str(weights) in err[0], err
        assert _sha(weights) == before and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------
# faults while writing, through the command line (subprocesses)
# ----------------------------------------------------------------------------------------
def _cli(args, *, fsize=None, fault=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault

    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "cryoves"] + args, env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=timeout)


def test_write_failure_during_overwrite_keeps_the_previous_results(tmp_path, tomo, random_weights):
    out = tmp_path / "out"
    base = ["segment", str(tomo), "--out", str(out), "--weights", str(random_weights), "--quiet"]
    assert main(base + ["--min-radius-nm", "14"]) == 0
    before, tomo_before = _tree(out), _sha(tomo)
    r = _cli(base + ["--overwrite"], fsize=200_000)  # the 885 kB label files cannot be written
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("cryoves segment: error")]
    assert len(err) == 1 and "File too large" in err[0] and str(out / "tomo_") in err[0], r.stderr
    assert "previous results are unchanged" in err[0]
    assert _tree(out) == before and not _hidden(out)  # nothing mixed: the old set, whole
    rec = json.loads((out / "tomo_segment.json").read_text())["params"]
    assert rec["min_radius_nm"] == 14 and rec["segment_min_radius_nm"] == 12  # the size rules move together
    assert _sha(tomo) == tomo_before


def test_killed_batch_resumes_and_never_takes_partial_results_as_finished(tmp_path, tomo, random_weights,
                                                                         capsys, monkeypatch):
    a, b = tmp_path / "in" / "a.mrc", tmp_path / "in" / "b.mrc"
    shutil.copy(tomo, a)
    shutil.copy(tomo, b)
    out = tmp_path / "out"
    args = ["segment", str(a), str(b), "--out", str(out), "--weights", str(random_weights), "--quiet"]
    r = _cli(args, fault="kill-commit:labels")  # killed while moving a's files into place
    assert r.returncode == -9, r.stderr
    assert (out / "a" / "a_labels.mrc").exists() and not (out / "a" / "a_segment.json").exists()
    assert not (out / "b").exists()

    assert main(args) == 0  # rerun: a is incomplete (redone), b is new
    err = capsys.readouterr().err
    assert "a.mrc: the results in" in err and "incomplete" in err and "redoing" in err
    for s in ("a", "b"):
        rec = json.loads((out / s / f"{s}_segment.json").read_text())
        assert rec["complete"] and set(rec["files"]) == {p.name for p in (out / s).iterdir()} - {f"{s}_segment.json"}
    assert not _hidden(out)
    done = _tree(out)

    import cryoves.cli.segment as seg

    monkeypatch.setattr(seg, "_load_model", lambda w: pytest.fail("finished tomograms must be skipped"))
    assert main(args) == 0  # nothing left to do
    cap = capsys.readouterr()
    assert [ln.split()[:2] for ln in cap.out.splitlines() if ln.startswith(("a.mrc ", "b.mrc "))] == \
        [["a.mrc", "skipped"], ["b.mrc", "skipped"]]
    assert _tree(out) == done


def test_cli_invert_is_recorded_and_the_input_untouched(tmp_path, tomo, random_weights, capsys):
    out = tmp_path / "out"
    before = _sha(tomo)
    assert main(["segment", str(tomo), "--out", str(out), "--weights", str(random_weights), "--quiet",
                 "--invert", "--formats", "csv"]) == 0
    rec = json.loads((out / "tomo_segment.json").read_text())
    assert rec["inverted"] is True and isinstance(rec["warnings"], list)
    assert _sha(tomo) == before


# ----------------------------------------------------------------------------------------
# the API
# ----------------------------------------------------------------------------------------
def test_api_refuses_angstrom_before_any_work(small_simulation):
    from cryoves.pipeline import segment

    t = small_simulation.tomogram.copy()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"voxel_size=20 nm is implausible.*Did you give Å\? 20 Å = 2 nm"):
        segment(t, 20.0, model="/no/such/weights.h5")  # the model would fail if it were reached
    assert time.perf_counter() - t0 < 5
    np.testing.assert_array_equal(t, small_simulation.tomogram)


@pytest.mark.parametrize("vs, match", [(float("inf"), "infinite"), (float("nan"), "not a number"), (-2.0, "not positive"),
                                       ("2.2nm", "must be a number"), (True, "must be a number")])
def test_api_voxel_size_messages(small_simulation, vs, match):
    from cryoves.pipeline import segment

    with pytest.raises((TypeError, ValueError), match=match):
        segment(small_simulation.tomogram, vs, model="/no/such/weights.h5")


def test_api_bad_volumes(small_simulation):
    from cryoves.pipeline import segment

    t = small_simulation.tomogram
    with pytest.raises(ValueError, match="4 voxels .* thinner than the smallest vesicle"):
        segment(t[:4], 2.2, model="/no/such/weights.h5")
    holes = t.copy()
    holes[3, 2, 1] = np.nan
    with pytest.raises(ValueError, match="1 of .* voxels are NaN or infinite .*Z slice 3"):
        segment(holes, 2.2, model="/no/such/weights.h5")
    with pytest.raises(TypeError, match="real numbers"):
        segment(t.astype(np.complex64), 2.2, model="/no/such/weights.h5")
    with pytest.raises(TypeError, match="read it first with cryoves.io.read_tomogram"):
        segment("tomo.mrc", 2.2)
    with pytest.raises(ValueError, match="same value"):
        segment(np.zeros_like(t), 2.2, model="/no/such/weights.h5")


def test_read_tomogram_wants_a_path(tmp_path):
    with pytest.raises(TypeError, match=r"read_tomogram\(\) wants the path of an MRC file, got a numpy array"):
        cio.read_tomogram(np.zeros((4, 4, 4)))
    d = tmp_path / "x.mrc"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        cio.read_tomogram(d)


def test_thin_volume_warns_about_the_field_of_view(small_simulation, oracle_probability):
    warns = validate.check_shape((30, 200, 200), 2.2)
    assert len(warns) == 1 and "along Z" in warns[0] and "field of view (44 voxels" in warns[0]
    assert validate.check_shape((60, 200, 200), 2.2) == []
    # the network's voxel size counts: at 1.1 nm per tomogram voxel its 44 voxels span 88
    assert "88 voxels" in validate.check_shape((60, 200, 200), 1.1, model_voxel_size=2.2)[0]


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------
def test_fine_voxels_with_strong_fringes_are_not_called_inverted():
    """At 1.0 nm (CTF uncorrected, -8 um) a membrane's bright fringes are as strong as its dip:
    most vesicles look 'bright', but the data are not inverted, and the check must not say so."""
    from cryoves.simulate import SimulationParams, simulate_tomogram

    sim = simulate_tomogram((112, 220, 220), params=SimulationParams(voxel_size=1.0, seed=50002))
    pol = validate.contrast_polarity(sim.tomogram, sim.table)
    assert pol["n"] >= 10 and pol["fraction_bright"] > 0.5  # the per-vesicle majority alone would warn
    assert not any("inverted" in w for w in validate.check_result(sim.tomogram, sim.table, 1.0))


def test_result_checks_flag_inverted_contrast(small_simulation, oracle_probability):
    from cryoves.pipeline import segment

    sim = small_simulation
    assert validate.check_result(sim.tomogram, sim.table, sim.voxel_size) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = segment(-sim.tomogram, sim.voxel_size, probability=oracle_probability)
    msgs = [str(w.message) for w in caught if issubclass(w.category, validate.ResultWarning)]
    assert len(msgs) == 1 and "the data look inverted" in msgs[0] and "--invert" in msgs[0], msgs
    assert res.n_accepted > 0
    assert res.warnings == msgs  # the result carries them too (napari shows them as notifications)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = segment(sim.tomogram, sim.voxel_size, probability=oracle_probability)
    assert not [w for w in caught if issubclass(w.category, validate.ResultWarning)]
    assert ok.warnings == []


def test_result_checks_flag_centres_outside_and_radii(small_simulation):
    sim = small_simulation
    t = sim.table.copy()
    z = t["z"].copy()
    z[0] = -3.0
    t["z"] = z
    warns = validate.check_result(sim.tomogram, t, sim.voxel_size)
    assert any(w.startswith("1 of 9 accepted vesicles have their centre outside the volume") for w in warns), warns
    warns = validate.check_result(sim.tomogram, sim.table, sim.voxel_size * 4)  # radii 4x too large
    assert any("radius outside the expected" in w for w in warns), warns
