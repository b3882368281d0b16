"""Start-up and speed mechanics of ``cryoves segment`` and the speed benchmark's report block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cryoves.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def test_model_is_built_in_a_background_thread(tmp_path, tomo, random_weights, monkeypatch, capsys):
    """TensorFlow and the U-Net load in another thread while the pipeline is imported."""
    import cryoves.cli.segment as seg

    seen = []
    real = seg._load_model

    def spy(weights):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(weights)

    monkeypatch.setattr(seg, "_load_model", spy)
    rc = main(["segment", str(tomo), "--out", str(tmp_path / "o"), "--weights", str(random_weights),
               "--formats", "csv"])
    assert rc == 0, capsys.readouterr().err
    assert seen == [False]
    assert (tmp_path / "o" / "tomo_vesicles.csv").is_file()
    # the run record names the device the U-Net ran on (no GPU on the test machines)
    import json

    record = json.loads((tmp_path / "o" / "tomo_segment.json").read_text())
    assert re.fullmatch(r"CPU \(\d+ cores\)", record["device"]), record["device"]
    assert record["precision"] == "float32"  # and its arithmetic (the tests ask for float32)


def test_error_while_tensorflow_loads_reaches_stderr(tmp_path, tomo):
    """An error raised while the background import holds the stderr descriptor is still printed."""
    # --p-threshold 2 is refused when the parameters are made, i.e. after the loader has started
    code = ("import sys; from cryoves.cli import main; "
            f"sys.exit(main(['segment', {str(tomo)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--p-threshold', '2']))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert "cryoves segment: loading the U-Net" in lines
    assert "--p-threshold" in lines[-1] and "error:" in lines[-1], r.stderr


def test_loader_error_is_raised_in_the_callers_thread(tmp_path, tomo, capsys):
    rc = main(["segment", str(tomo), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "none.h5")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none.h5" in err.splitlines()[-1] and "Traceback" not in err


def _speed_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return speed


def test_speed_report_replaces_only_its_block(tmp_path):
    speed = _speed_module()
    md = tmp_path / "speed.md"
    md.write_text("# Speed\n\nintro\n\n" + speed.BEGIN + "\nold figures\n" + speed.END + "\n\n## The editor\n\nkept\n")
    speed.write_report(md, speed.BEGIN + "\nnew figures\n" + speed.END)
    text = md.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.startswith("# Speed\n\nintro\n") and text.endswith("## The editor\n\nkept\n")
    assert text.count(speed.BEGIN) == 1
    # without markers the block is appended, the rest kept
    md2 = tmp_path / "other.md"
    md2.write_text("# Speed\n\n## The editor\n")
    speed.write_report(md2, speed.BEGIN + "\nx\n" + speed.END)
    assert md2.read_text() == "# Speed\n\n## The editor\n\n" + speed.BEGIN + "\nx\n" + speed.END + "\n"


def test_speed_report_table_is_well_formed():
    speed = _speed_module()
    row = {"size": "1×2×3", "wall": 10.0, "first": 0.3, "startup": 4.0,
           "stages": {"predict": 5.0, "global": 1.0, "adaptive": 1.0, "refine": 1.0, "outliers": 1.0, "write": 0.5},
           "post": 4.5, "post_frac": 0.45, "rss": 1.0, "tomo_gb": 0.1, "net_vps": 2e6, "ref": 100.0,
           "ref_tiles": 10, "ref_timed": 4, "ref_extrapolated": True, "ref_per_tile": 0.1, "ratio_predict": 20.0,
           "ratio_e2e": 10.0, "load_seg": (0.5, 1.0), "load_ref": (1.0, 1.0), "n": 3, "cpu": 12.0,
           "main": 4.0, "load_main": (1.0, 1.2), "ratio_main": 25.0}
    block = speed.report_block([row], {"date": "d", "command": "c", "runtime": 1.0, "machine": "m", "seeds": "1",
                                       "weights": "w"})
    tables = [ln for ln in block.splitlines() if ln.startswith("|")]
    # every row of a table has as many cells as its header
    groups, cur = [], []
    for ln in block.splitlines():
        if ln.startswith("|"):
            cur.append(ln.count("|"))
        elif cur:
            groups.append(cur)
            cur = []
    assert len(groups) == 2 and all(len(set(g)) == 1 for g in groups), tables
    assert "extrapolated from 4 tiles" in block
    assert "| 4.0 s | **25.0×** | **20.0×** |" in block  # the main pass and its ratio beside the stage's
    from cryoves.pipeline import SegmentParams

    assert f"shrunk to {SegmentParams().large_scale:g})" in block  # the pipeline's scale, not a copy


def test_post_floor_variants_switch_off_what_they_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import post_floor
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from cryoves.pipeline import SegmentParams

    assert post_floor.variant_params("default") == SegmentParams()
    lean = post_floor.variant_params("lean")
    assert (lean.capture, lean.outlier_max_iter) == (False, 0)
    assert lean.split_fine_step == lean.split_step  # no bisection below the coarse step
    assert lean.adaptive and lean.outliers
    assert not post_floor.variant_params("lean, no adaptive").adaptive
    assert not post_floor.variant_params("lean, no outlier stage").outliers
    # every variant differs from the default only where it says
    for name, changes in post_floor.VARIANTS.items():
        p = post_floor.variant_params(name)
        differ = {f for f in SegmentParams.__dataclass_fields__ if getattr(p, f) != getattr(SegmentParams(), f)}
        assert differ == set(changes), name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
