"""Compare a run's Tables 1-4 with a stored reference (``data/reference/*_tables.csv``).

    python benchmarks/compare_tables.py runs/full10 data/reference/manic_switch_seed0_10patients_tables.csv

Computes ``analysis.tables.compare_published`` on the run's ``results.csv`` (the format the
reference was stored in) and compares every mean and SD with the reference at six significant
digits (the file's precision). Prints each cell that differs, per arm, and a last line
``equal N of M`` (exit 0 when all are equal, 1 otherwise). Cells of the arms named with
``--tolerant ARM`` (e.g. the dense ketamine-like arm on another instruction set) are compared at
``--rtol`` instead and counted separately.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["table", "column", "arm"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--tolerant", action="append", default=[], help="arm compared at --rtol")
    parser.add_argument("--rtol", type=float, default=0.01)
    args = parser.parse_args()

    from analysis.tables import compare_published

    results = pd.read_csv(args.run_dir / "results.csv")
    protocol = json.loads((args.run_dir / "protocol.json").read_text())
    ours = compare_published(results, protocol=protocol).set_index(KEY)
    ref = pd.read_csv(args.reference).set_index(KEY)
    both = ref[["mean", "sd"]].join(ours[["mean", "sd"]], rsuffix="_ours", how="left")
    equal = total = 0
    for key, row in both.iterrows():
        for stat in ("mean", "sd"):
            a, b = row[stat], row[f"{stat}_ours"]
            total += 1
            if pd.isna(a) and pd.isna(b):
                equal += 1
                continue
            same = f"{a:.6g}" == f"{b:.6g}"
            if not same and key[2] in args.tolerant:
                same = bool(np.isclose(a, b, rtol=args.rtol, atol=1e-9))
                tag = "within rtol" if same else "DIFFERS"
                print(f"{tag:12s} {' / '.join(map(str, key))} {stat}: reference {a:.6g}, ours {b:.6g}")
            elif not same:
                print(f"{'DIFFERS':12s} {' / '.join(map(str, key))} {stat}: reference {a:.6g}, ours {b:.6g}")
            equal += same
    print(f"equal {equal} of {total}")
    return 0 if equal == total else 1


if __name__ == "__main__":
    sys.exit(main())
