"""``cryoves evaluate`` end to end, through ``cryoves.cli.main``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cryoves.cli import build_parser, main

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    return capsys.readouterr().out


def test_help_states_defaults_and_run_time(capsys):
    text = _help_text(capsys)
    assert "default: []" not in text and "(default: None)" not in text
    assert "``" not in text and ":func:" not in text          # no raw reST
    for suite in ("quick", "default", "stress"):
        assert re.search(rf"{suite}\s.*min", text), suite
    # every option says what happens when it is not given
    sub = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings


def test_unknown_case_is_refused_before_any_work(capsys):
    assert main(["evaluate", "--suite", "quick", "--case", "no-such-case"]) == 2
    err = capsys.readouterr().err
    assert "no-such-case" in err and "quick-2.2nm" in err


def test_seed_offset_names_the_development_copy(capsys):
    """--seed-offset evaluates a development copy: its cases carry the offset in their names."""
    assert main(["evaluate", "--suite", "quick", "--seed-offset", "7", "--case", "quick-1.6nm"]) == 2
    err = capsys.readouterr().err
    assert "quick-1.6nm-dev7" in err and "quick-2.2nm-dev7" in err


def test_truth_without_tomogram_is_refused(capsys):
    assert main(["evaluate", "--truth", "x.csv"]) == 2
    assert "--tomogram" in capsys.readouterr().err


def test_evaluate_end_to_end_on_one_small_case(tmp_path, capsys):
    report = tmp_path / "report.md"
    rc = main(["evaluate", "--suite", "quick", "--case", "quick-2.2nm", "--weights", "default",
               "--report", str(report)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = report.read_text()
    assert "suite `quick`" in text
    rows = [line for line in text.splitlines() if line.startswith("| default")]
    assert len(rows) == 2                                       # the metric row and the stage row
    metric = rows[0].split("|")[1:-1]
    assert metric[1].strip() == "quick-2.2nm"
    # weights, case, 5 Dice values, GT, TP, FP, FN, F1, ...
    gt, tp, f1 = int(metric[7]), int(metric[8]), float(metric[11])
    assert gt > 0 and 0 <= tp <= gt and 0.0 <= f1 <= 1.0
    assert f1 > 0.5                                            # the shipped model finds vesicles
    # the stage table: found (−lost, +false) for every stage, the final count equals TP
    stage = rows[1].split("|")[1:-1]
    cells = [c.strip() for c in stage[3:]]
    assert len(cells) == 5
    parsed = [re.fullmatch(r"(\d+) \(−(\d+), \+(\d+)\)", c) for c in cells]
    assert all(parsed), cells
    assert int(parsed[-1].group(1)) == tp
    # what was found before and lost at each stage adds up
    found_before = gt
    for m in parsed:
        found, lost = int(m.group(1)), int(m.group(2))
        assert lost <= found_before
        found_before = found
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference CryoVesNet weights not available")
def test_evaluate_two_weights_side_by_side(tmp_path, capsys):
    report = tmp_path / "report.md"
    rc = main(["evaluate", "--suite", "quick", "--case", "quick-2.2nm", "--weights", "default",
               "--weights", str(REFERENCE), "--report", str(report)])
    assert rc == 0, capsys.readouterr().err
    text = report.read_text()
    assert sum(line.startswith("| default") for line in text.splitlines()) == 2
    assert sum(line.startswith("| weights.h5") for line in text.splitlines()) == 2
