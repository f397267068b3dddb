"""Tests of analysis.tables: the paper's Tables 1-4 from a results table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import format_tables, load_published, paper_tables
from analysis.synthetic import make_protocol, make_results
from analysis.tables import compare_published

TOL = 1e-9


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return make_results(n_patients=7, seed=11)


def _raw(df, arm, phase, metric, condition="", sigma=None):
    """Independent per-patient values: plain boolean masks and numpy, no analysis code."""
    cond = df["condition"].fillna("").astype(str)
    m = (
        (df["arm"] == arm)
        & (df["phase"] == phase)
        & (df["metric"] == metric)
        & (cond == condition)
    )
    if sigma is not None:
        m &= np.abs(df["noise_sigma"].to_numpy() - sigma) < 1e-9
    sub = df[m].sort_values("patient")
    return sub["value"].to_numpy(dtype=float)


@pytest.mark.parametrize(
    ("table", "column", "metric", "condition", "sigma"),
    [
        ("Table 1", "Sparsity (%)", "sparsity", "", None),
        ("Table 1", "Clean (%)", "accuracy", "clean", None),
        ("Table 1", "Standard (%)", "accuracy", "standard", None),
        ("Table 1", "Combined (%)", "accuracy", "combined", None),
        ("Table 2", "None (%)", "accuracy", "internal_noise", 0.0),
        ("Table 2", "Severe (σ=1.5) (%)", "accuracy", "internal_noise", 1.5),
        ("Table 2", "Extreme (σ=2.5) (%)", "accuracy", "internal_noise", 2.5),
        ("Table 3", "Gain Multiplier", "gain", "", None),
        ("Table 3", "Biased Stress Accuracy (%)", "accuracy", "biased", None),
        ("Table 3", "Activation Magnitude", "activation_magnitude", "", None),
    ],
)
def test_tables_1_to_3_match_numpy_mean_and_population_sd(
    results, table, column, metric, condition, sigma
):
    """Each cell is the numpy mean and population SD (ddof=0) over patients of the arm's rows."""
    tab = paper_tables(results)[table]
    for arm in ["untreated", "ketamine", "ssri", "neurosteroid"]:
        phase = "pruned" if arm == "untreated" else "acute"
        vals = _raw(results, arm, phase, metric, condition, sigma)
        assert vals.size == 7
        assert tab.loc[arm, (column, "mean")] == pytest.approx(np.mean(vals), abs=TOL)
        assert tab.loc[arm, (column, "sd")] == pytest.approx(np.std(vals, ddof=0), abs=TOL)


def test_table_shapes_and_row_order_follow_results():
    """Rows: untreated first, then arms in order of appearance; columns as in the paper."""
    df = make_results(n_patients=3, arms=("ssri", "ketamine"), seed=2)
    tabs = paper_tables(df)
    assert list(tabs) == ["Table 1", "Table 2", "Table 3", "Table 4"]
    for tab in tabs.values():
        assert list(tab.index) == ["untreated", "ssri", "ketamine"]
        assert tab.index.name == "arm"
        assert set(tab.columns.get_level_values("stat")) == {"mean", "sd"}
    assert list(tabs["Table 1"].columns.get_level_values(0).unique()) == [
        "Sparsity (%)",
        "Clean (%)",
        "Standard (%)",
        "Combined (%)",
    ]
    assert list(tabs["Table 2"].columns.get_level_values(0).unique()) == [
        "None (%)",
        "Moderate (σ=0.5) (%)",
        "High (σ=1.0) (%)",
        "Severe (σ=1.5) (%)",
        "Extreme (σ=2.5) (%)",
    ]
    assert list(tabs["Table 4"].columns.get_level_values(0).unique()) == [
        "Combined Stress (%)",
        "Biased Stress (%)",
        "Gain Multiplier",
        "Activation Magnitude",
        "Acute Relapse Drop (%)",
        "Manic Relapse Prob. (%)",
        "MS Decay Rate",
    ]


def test_table4_relapse_probability_and_decay_rate_by_hand():
    """Relapse prob. = patient mean of 100 x share of relapsed durations; decay from protocol."""
    df = make_results(n_patients=4, arms=("ssri",), seed=3)
    rel = (df["metric"] == "relapsed") & (df["arm"] == "ssri")
    durations = sorted(df.loc[rel, "maintenance_epochs"].unique())
    planted = {0: [1, 1, 1, 1, 1, 1], 1: [0, 0, 0, 1, 1, 1], 2: [0] * 6, 3: [1, 0, 0, 0, 0, 0]}
    for p, flags in planted.items():
        for d, f in zip(durations, flags, strict=True):
            df.loc[rel & (df["patient"] == p) & (df["maintenance_epochs"] == d), "value"] = f
    per_patient = np.array([100.0 * np.mean(v) for v in planted.values()])  # 100, 50, 0, 16.67
    tab = paper_tables(df, protocol=make_protocol(["ssri"], decay={"ssri": 0.015}))["Table 4"]
    col = "Manic Relapse Prob. (%)"
    assert tab.loc["ssri", (col, "mean")] == pytest.approx(per_patient.mean(), abs=TOL)
    assert tab.loc["ssri", (col, "sd")] == pytest.approx(per_patient.std(ddof=0), abs=TOL)
    assert tab.loc["ssri", ("MS Decay Rate", "mean")] == pytest.approx(0.015)
    assert math.isnan(tab.loc["untreated", (col, "mean")])
    assert math.isnan(tab.loc["untreated", ("Acute Relapse Drop (%)", "mean")])
    no_protocol = paper_tables(df)["Table 4"]
    assert math.isnan(no_protocol.loc["ssri", ("MS Decay Rate", "mean")])
    drop = _raw(df, "ssri", "acute_relapse", "relapse_drop")
    assert tab.loc["ssri", ("Acute Relapse Drop (%)", "mean")] == pytest.approx(drop.mean())


def test_tables_survive_csv_round_trip(results, tmp_path):
    """Reading results.csv back (empty condition -> NaN) gives the same tables."""
    path = tmp_path / "results.csv"
    results.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert back["condition"].isna().any()
    a, b = paper_tables(results), paper_tables(back)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, atol=1e-9)


def test_load_published_reads_the_paper_numbers():
    """The published CSV has every table and the text's off-medication numbers."""
    pub = load_published()
    assert set(pub["table"]) == {"1", "2", "3", "4", "text"}
    row = pub[
        (pub["arm"] == "ssri") & (pub["metric"] == "accuracy") & (pub["condition"] == "biased")
    ]
    assert row["mean"].iloc[0] == pytest.approx(47.2)
    assert row["sd"].iloc[0] == pytest.approx(12.7)
    assert (pub.loc[pub["metric"] == "sparsity", "condition"] == "").all()


def test_load_published_rejects_bad_input(tmp_path):
    """A missing file or missing column is a ValueError, a wrong type a TypeError."""
    with pytest.raises(ValueError, match="not found"):
        load_published(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("table,arm\n1,ketamine\n")
    with pytest.raises(ValueError, match="missing column"):
        load_published(bad)
    with pytest.raises(TypeError):
        load_published(3)


def test_bad_results_are_rejected():
    """Non-frames are TypeErrors, frames missing schema columns ValueErrors."""
    with pytest.raises(TypeError, match="DataFrame"):
        paper_tables({"arm": []})
    with pytest.raises(ValueError, match="missing required column"):
        paper_tables(pd.DataFrame({"arm": ["x"], "value": [1.0]}))
    with pytest.raises(TypeError, match="protocol"):
        paper_tables(make_results(n_patients=2), protocol=[1, 2])


def test_format_tables_cells_read_ours_then_paper(results):
    """Each cell is 'ours mean ± sd  (paper mean ± sd)' with the paper's decimals."""
    text = format_tables(results, protocol=make_protocol())
    vals = _raw(results, "ssri", "acute", "accuracy", "biased")
    cell = f"{vals.mean():.1f} ± {vals.std(ddof=0):.1f}  (paper 47.2 ± 12.7)"
    assert cell in text
    act = _raw(results, "ketamine", "acute", "activation_magnitude")
    assert f"{act.mean():.3f} ± {act.std(ddof=0):.3f}  (paper 0.649 ± 0.079)" in text
    for name in ["Table 1.", "Table 2.", "Table 3.", "Table 4.", "damping module off"]:
        assert name in text
    assert "0.0150  (paper 0.0150)" in text
    assert "Untreated (pruned)" in text and "SSRI-like" in text
    off = _raw(results, "neurosteroid", "off_medication", "accuracy", "combined")
    assert f"{off.mean():.1f} ± {off.std(ddof=0):.1f}  (paper 78.5 ± 4.9)" in text


def test_format_tables_without_off_medication_or_paper_values():
    """No off-medication rows: no fifth block; an unknown arm shows its name, paper n/a."""
    df = make_results(n_patients=2, arms=("lithium",), seed=4)
    text = format_tables(df)
    assert "damping module off" not in text
    assert "lithium" in text
    assert "(paper n/a)" in text


def test_compare_published_deviation_in_our_sd_units(results):
    """deviation_sd = (ours - paper) / our SD, inf/0 when our SD is zero."""
    cmp = compare_published(results)
    row = cmp[
        (cmp["table"] == "Table 3")
        & (cmp["arm"] == "ssri")
        & (cmp["column"] == "Biased Stress Accuracy (%)")
    ].iloc[0]
    vals = _raw(results, "ssri", "acute", "accuracy", "biased")
    assert row["deviation_sd"] == pytest.approx((vals.mean() - 47.2) / vals.std(ddof=0))
    sparsity = cmp[
        (cmp["table"] == "Table 1")
        & (cmp["arm"] == "ketamine")
        & (cmp["column"] == "Sparsity (%)")
    ].iloc[0]
    assert sparsity["deviation_sd"] == 0.0


def test_zero_sd_deviation_judged_at_the_papers_precision():
    """With our SD 0, a mean that rounds to the published value at its printed decimals (94.9993 vs
    95.0) deviates by 0, and one that does not (94.9 vs 95.0) by -inf."""
    from analysis.tables import _deviation

    assert _deviation(94.9993, 0.0, 95.0, 1) == 0.0
    assert _deviation(94.9, 0.0, 95.0, 1) == -math.inf
    assert _deviation(95.06, 0.0, 95.0, 1) == math.inf


def test_importing_analysis_loads_no_torch():
    """The analysis package (tables, claims, statistics, report) imports without torch: the results
    vocabulary lives in the torch-free virtualpatient.schema."""
    import subprocess
    import sys

    code = ("import sys, analysis, analysis.tables, analysis.claims, analysis.stats, analysis.report; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
