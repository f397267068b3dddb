"""benchmarks/compare_tables.py: exact (six digits) on the machine kind of a reference, within spread
across kinds. Checked on a synthetic run folder and references derived from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from analysis.synthetic import make_results, write_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_tables.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), make_results(n_patients=6, seed=3))


def test_equal_tables_pass_and_a_changed_digit_fails(tool, run, tmp_path, capsys):
    """A reference made from the run itself is equal in every cell; one mean changed in its sixth
    significant digit is reported as the only difference (exit 1)."""
    ref = tool.run_tables(run)
    ref.to_csv(tmp_path / "ref.csv", index=False, float_format="%.6g")
    assert tool.main([str(run), str(tmp_path / "ref.csv")]) == 0
    i = ref.index[ref["mean"].fillna(0) > 10][0]
    value = float(f"{ref.loc[i, 'mean']:.6g}")
    ref.loc[i, "mean"] = value + 10.0 ** (np.floor(np.log10(abs(value))) - 5)  # one unit of the sixth digit
    ref.to_csv(tmp_path / "ref.csv", index=False, float_format="%.6g")
    capsys.readouterr()
    assert tool.main([str(run), str(tmp_path / "ref.csv")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("DIFFERS")]) == 1 and out[-1].startswith("equal ")


def test_spread_accepts_other_draws_and_refuses_a_shift(tool, run, tmp_path, capsys):
    """--spread: means moved by one standard error pass (|z| = 1 <= 3); one moved by five fails,
    with its z printed; z is computed independently here."""
    ref = tool.run_tables(run)
    se = np.sqrt(2 * ref["sd"] ** 2 / ref["n"])
    moved = ref.copy()
    moved["mean"] = ref["mean"] + se.fillna(0)
    moved.to_csv(tmp_path / "near.csv", index=False)
    assert tool.main([str(run), str(tmp_path / "near.csv"), "--spread"]) == 0
    i = ref.index[se.fillna(0) > 0][0]
    moved.loc[i, "mean"] = ref.loc[i, "mean"] + 5 * se[i]
    moved.to_csv(tmp_path / "far.csv", index=False)
    capsys.readouterr()
    assert tool.main([str(run), str(tmp_path / "far.csv"), "--spread"]) == 1
    out = capsys.readouterr().out
    assert "z -5.00" in out and "largest |z| 5.00" in out
