"""Compare a run's Tables 1-4 with a stored reference (``data/reference/*_tables.csv``).

    python benchmarks/compare_tables.py runs/full10 data/reference/manic_switch_seed0_10patients_tables.csv
    python benchmarks/compare_tables.py runs/full10 REFERENCE --spread     # a run from another kind of CPU

Computes ``analysis.tables.compare_published`` on the run's ``results.csv`` (the format the
reference was stored in). By default every mean and SD must equal the reference at six significant
digits (the file's precision): the check for a run on the kind of machine that made the reference.
Prints each cell that differs and a last line ``equal N of M`` (exit 0 when all are equal, 1
otherwise). Cells of the arms named with ``--tolerant ARM`` are compared at ``--rtol`` instead.

Across kinds of CPU the numbers are other draws of the same model, not the same digits (the
baseline training rounds differently from the first epoch on), so ``--spread`` judges each mean
by ``z = (ours - reference) / sqrt((sd_ours^2 + sd_reference^2) / n)`` and requires ``|z| <= --z``
(default 3); cells with zero spread on both sides must still agree at six digits. The last line
reads ``within spread N of M, largest |z| Z``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["table", "column", "arm"]


def run_tables(run_dir: Path) -> pd.DataFrame:
    """Tables 1-4 of a run folder, in the reference files' layout."""
    from analysis.tables import compare_published

    results = pd.read_csv(run_dir / "results.csv")
    protocol = json.loads((run_dir / "protocol.json").read_text())
    return compare_published(results, protocol=protocol)


def _same(a: float, b: float) -> bool:
    return (pd.isna(a) and pd.isna(b)) or f"{a:.6g}" == f"{b:.6g}"


def digits(ours: pd.DataFrame, ref: pd.DataFrame, tolerant: list[str], rtol: float) -> tuple[list[str], int, int]:
    """Cells (means and SDs) that differ at six significant digits; (lines, equal, total)."""
    both = ref[KEY + ["mean", "sd"]].merge(ours[KEY + ["mean", "sd"]], on=KEY, how="left", suffixes=("", "_ours"))
    lines, equal, total = [], 0, 0
    for _, row in both.iterrows():
        key = tuple(row[k] for k in KEY)
        for stat in ("mean", "sd"):
            a, b = row[stat], row[f"{stat}_ours"]
            total += 1
            same = _same(a, b)
            if not same and key[2] in tolerant:
                same = bool(np.isclose(a, b, rtol=rtol, atol=1e-9))
                lines.append(f"{'within rtol' if same else 'DIFFERS':12s} {' / '.join(map(str, key))} {stat}: "
                             f"reference {a:.6g}, ours {b:.6g}")
            elif not same:
                lines.append(f"{'DIFFERS':12s} {' / '.join(map(str, key))} {stat}: reference {a:.6g}, ours {b:.6g}")
            equal += same
    return lines, equal, total


def spread(ours: pd.DataFrame, ref: pd.DataFrame, z_max: float) -> tuple[list[str], int, int, float]:
    """Means judged by their two-sample z; (lines, within, total, largest |z|)."""
    m = ref.merge(ours, on=KEY, suffixes=("", "_ours"), how="left")
    lines, within, total, largest = [], 0, 0, 0.0
    for _, r in m.iterrows():
        if pd.isna(r["mean"]) and pd.isna(r["mean_ours"]):
            continue
        total += 1
        se = float(np.sqrt((r["sd"] ** 2 + r["sd_ours"] ** 2) / r["n"]))
        if se == 0 or not np.isfinite(se):
            ok, z = _same(r["mean"], r["mean_ours"]), 0.0
        else:
            z = float((r["mean_ours"] - r["mean"]) / se)
            ok = abs(z) <= z_max
        largest = max(largest, abs(z))
        within += ok
        if not ok:
            lines.append(f"{'DIFFERS':12s} {r['table']} / {r['column']} / {r['arm']}: reference {r['mean']:.6g}, "
                         f"ours {r['mean_ours']:.6g} (z {z:+.2f})")
    return lines, within, total, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--tolerant", action="append", default=[], help="arm compared at --rtol")
    parser.add_argument("--rtol", type=float, default=0.01)
    parser.add_argument("--spread", action="store_true", help="judge means by their z (another kind of CPU)")
    parser.add_argument("--z", type=float, default=3.0, help="largest |z| within spread (default 3)")
    args = parser.parse_args(argv)

    ours, ref = run_tables(args.run_dir), pd.read_csv(args.reference)
    if args.spread:
        lines, ok, total, largest = spread(ours, ref, args.z)
        print("\n".join(lines + [f"within spread {ok} of {total}, largest |z| {largest:.2f}"]))
    else:
        lines, ok, total = digits(ours, ref, args.tolerant, args.rtol)
        print("\n".join(lines + [f"equal {ok} of {total}"]))
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
