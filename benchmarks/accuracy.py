"""Accuracy benchmark: the paper's tables (per-stage Dice, F1, δd, Δc) on the held-out
simulated suite, for the shipped default weights and — when ../shared/reference is beside the
repository — the reference CryoVesNet weights through the same pipeline, side by side.

    python benchmarks/accuracy.py [--suite quick|default] [--report docs/accuracy.md]
"""

import argparse
import sys
from pathlib import Path

from cryoves.cli import main

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cryovesnet-weights" / "weights.h5"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="default", choices=["default", "quick"])
    ap.add_argument("--report", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference weights")
    a = ap.parse_args()
    argv = ["evaluate", "--suite", a.suite, "--weights", "default"]
    if REFERENCE.is_file() and not a.no_reference:
        argv += ["--weights", str(REFERENCE)]
    if a.report:
        argv += ["--report", a.report]
    sys.exit(main(argv))
