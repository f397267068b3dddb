"""Tests of :mod:`analysis.dose_response` on seeded synthetic sweeps with planted truths.

Every dataset is built here from an explicit generator: patients with a random intercept (so a
patient's values across levels are correlated, as when a sweep reuses the pruned baseline), a
planted response across levels, and Gaussian noise.  Reference values are computed independently
(numpy/scipy by hand) and compared with an explicit tolerance.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import dose_response as dr

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sweep(rng, response, n_patients=15, levels=LEVELS, arm="ssri", sd_patient=2.0, sd_noise=1.0):
    """A tidy sweep table: value = patient intercept + response(level) + noise."""
    u = rng.normal(0.0, sd_patient, n_patients)
    rows = [
        (p, arm, "acute", "accuracy", "combined", float(x), u[p] + float(response(x)) + rng.normal(0.0, sd_noise))
        for p in range(n_patients)
        for x in levels
    ]
    return pd.DataFrame(rows, columns=["patient", "arm", "phase", "metric", "condition", "pruning.fraction", "value"])


ALLOWED_IMPORTS = {"__future__", "math", "warnings", "collections", "numbers", "numpy", "pandas", "scipy",
                   "statsmodels", "matplotlib", "analysis._results"}


@pytest.mark.parametrize("module", ["analysis/dose_response.py", "analysis/replication.py"])
def test_module_imports_no_torch_or_paper_code(module):
    """Every import statement (module level or inside functions) of the general modules names only the
    standard library, numpy/pandas/scipy/statsmodels/matplotlib or analysis._results: never torch,
    virtualpatient, analysis.claims, analysis.tables or analysis._data.  (Importing the ``analysis`` package
    itself loads analysis.tables through its ``__init__``; that is outside these modules.)"""
    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names, "no imports found: the check would be vacuous"
    bad = {n for n in names if n not in ALLOWED_IMPORTS and n.split(".")[0] not in ALLOWED_IMPORTS - {"analysis"}}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", ["analysis/stats.py", "analysis/survival.py", "analysis/summaries.py",
                                    "analysis/longitudinal.py", "analysis/trajectories.py"])
def test_general_statistics_never_import_the_papers_tables_or_claims(module):
    """The general statistics select cells through analysis._data (the results vocabulary): no
    import statement, at module level or inside a function, names analysis.tables, analysis.claims
    or analysis.report (issue: general statistics never import the paper's tables)."""
    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / module).read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert any(n and n.startswith("analysis.") for n in names), "no analysis imports found: vacuous"
    assert not names & {"analysis.tables", "analysis.claims", "analysis.report", "analysis.family"}


def test_level_summary_matches_hand_computed_t_interval():
    """Per-level n, mean, SD (ddof=1) and the t interval equal numpy/scipy computed by hand (1e-12)."""
    df = sweep(np.random.default_rng(0), lambda x: 10 * x, n_patients=7)
    out = dr.level_summary(df, "pruning.fraction", "accuracy")
    assert list(out["level"]) == list(LEVELS)
    for _, row in out.iterrows():
        v = df.loc[df["pruning.fraction"] == row["level"], "value"].to_numpy()
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        assert row["n"] == 7
        assert row["mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert row["sd"] == pytest.approx(v.std(ddof=1), abs=1e-12)
        assert row["conf_int_low"] == pytest.approx(v.mean() - half, abs=1e-12)
        assert row["conf_int_high"] == pytest.approx(v.mean() + half, abs=1e-12)


def test_trend_finds_planted_trend():
    """A planted slope of 3 per unit level (noise SD 1, 15 patients) gives p < 0.01 in both tests, and the
    slope's CI covers 3."""
    df = sweep(np.random.default_rng(1), lambda x: 3.0 * x)
    res = dr.trend_test(df, "pruning.fraction", "accuracy")
    row = res.table.iloc[0]
    assert row["pvalue"] < 0.01
    assert row["page_pvalue"] < 0.01
    assert row["conf_int_low"] < 3.0 < row["conf_int_high"]
    assert res.params["ssri"] == pytest.approx(3.0, abs=3 * row["std_err"])
    assert "GEE" in res.summary() and "ssri" in res.summary()


def test_trend_slope_equals_ols_slope_in_complete_balanced_design():
    """With every patient at every level the GEE slope equals the pooled OLS slope (np.polyfit), 1e-8."""
    df = sweep(np.random.default_rng(2), lambda x: -4.0 * x)
    ref = np.polyfit(df["pruning.fraction"], df["value"], 1)[0]
    assert dr.trend_test(df, "pruning.fraction", "accuracy").params["ssri"] == pytest.approx(ref, abs=1e-8)


def test_trend_respects_repeated_measures_against_naive_ols():
    """Clustering matters: with a strong patient-level random slope, the GEE p-value is larger than naive
    OLS's (which treats 75 observations as independent), so a naive analysis would overstate evidence."""
    rng = np.random.default_rng(3)
    slopes = rng.normal(0.5, 3.0, 15)
    rows = [(p, "ssri", "m", x, slopes[p] * x + rng.normal(0, 0.3)) for p in range(15) for x in LEVELS]
    df = pd.DataFrame(rows, columns=["patient", "arm", "metric", "dose", "value"])
    gee_p = dr.trend_test(df, "dose", "m").pvalue["ssri"]
    ols_p = stats.linregress(df["dose"], df["value"]).pvalue
    assert gee_p > ols_p


def test_trend_null_false_positive_rate_near_nominal():
    """Over 200 seeded null datasets (no trend, patient intercept SD 2, noise SD 1, 15 patients, 5 levels)
    the share of GEE p < 0.05 lies in [0.01, 0.09], as does Page's; and a planted null is not found
    (p > 0.05) in the first dataset."""
    rng = np.random.default_rng(2024)
    # 200 independent datasets as 200 arms of one table: trend_test analyses each arm on its own
    many = pd.concat([sweep(rng, lambda x: 0.0, arm=f"null{i}") for i in range(200)], ignore_index=True)
    table = dr.trend_test(many, "pruning.fraction", "accuracy").table
    assert len(table) == 200 and (table["n_patients"] == 15).all() and (table["n_levels"] == 5).all()
    gee, page = table["pvalue"].to_numpy(), table["page_pvalue"].to_numpy()
    assert gee[0] > 0.05
    fpr_gee, fpr_page = np.mean(gee < 0.05), np.mean(page < 0.05)
    print(f"null false-positive rate over 200 datasets: GEE {fpr_gee:.3f}, Page {fpr_page:.3f}")
    assert 0.01 <= fpr_gee <= 0.09
    assert 0.01 <= fpr_page <= 0.09


def test_trend_one_sided_and_incomplete_design():
    """A decreasing planted trend is significant for 'decreasing' and not for 'increasing'; with a missing
    patient x level cell Page's test is skipped with a note while the GEE still runs."""
    df = sweep(np.random.default_rng(4), lambda x: -3.0 * x)
    dec = dr.trend_test(df, "pruning.fraction", "accuracy", alternative="decreasing").table.iloc[0]
    inc = dr.trend_test(df, "pruning.fraction", "accuracy", alternative="increasing").table.iloc[0]
    assert dec["pvalue"] < 0.01 and inc["pvalue"] > 0.99
    assert dec["pvalue"] + inc["pvalue"] == pytest.approx(1.0, abs=1e-12)
    res = dr.trend_test(df.iloc[1:], "pruning.fraction", "accuracy").table.iloc[0]
    assert np.isnan(res["page_pvalue"]) and "Page" in res["note"] and res["pvalue"] < 0.01


def test_cohort_patients_and_where_filter():
    """With a cohort column, patient 0 of cohort 0 and of cohort 1 are different patients (30 clusters, not
    15), and where= selects one value of another swept field; the slope then equals np.polyfit's."""
    rng = np.random.default_rng(10)
    a = sweep(rng, lambda x: 2.0 * x).assign(cohort=0)
    b = sweep(rng, lambda x: 2.0 * x).assign(cohort=1)
    two = pd.concat([a, b], ignore_index=True).assign(**{"arms.ssri.gain_end": 1.6})
    other = two.assign(**{"arms.ssri.gain_end": 2.0, "value": two["value"] + 100 * two["pruning.fraction"]})
    both = pd.concat([two, other], ignore_index=True)
    with pytest.raises(ValueError, match="arms.ssri.gain_end"):
        dr.trend_test(both, "pruning.fraction", "accuracy")
    row = dr.trend_test(both, "pruning.fraction", "accuracy", where={"arms.ssri.gain_end": 1.6}).table.iloc[0]
    assert row["n_patients"] == 30 and row["df"] == 29
    assert row["slope"] == pytest.approx(np.polyfit(two["pruning.fraction"], two["value"], 1)[0], abs=1e-8)
    assert not np.isnan(row["page_pvalue"])


PLANTED = {"bottom": 20.0, "top": 90.0, "midpoint": 0.6, "slope": -15.0}


def test_logistic_recovers_planted_parameters_within_ci():
    """A planted falling sigmoid (midpoint 0.6, slope -15, 20..90, noise SD 2) over 9 levels and 12 patients,
    in 10 seeded sweeps: the midpoint's CI covers 0.6 in at least 8 of 10 (at the nominal 95 %, 7 or fewer
    happens with probability 1.2 %), the CI is narrow (< 0.05), and bottom, top and slope are within 5 %."""
    levels = tuple(np.linspace(0.0, 1.0, 9))
    covered = 0
    for seed in range(10):
        df = sweep(np.random.default_rng(100 + seed), lambda x: dr.logistic4(x, **PLANTED), n_patients=12,
                   levels=levels, sd_patient=1.0, sd_noise=2.0)
        fit = dr.fit_logistic(df, "pruning.fraction", "accuracy", n_resamples=100, seed=seed)
        row = fit.table.iloc[0]
        assert row["fitted"] and row["reason"] == ""
        covered += row["midpoint_ci_low"] < PLANTED["midpoint"] < row["midpoint_ci_high"]
        assert row["midpoint_ci_high"] - row["midpoint_ci_low"] < 0.05
        for name in ("bottom", "top", "slope"):
            assert row[name] == pytest.approx(PLANTED[name], rel=0.05), name
        assert row["n_boot"] >= 95
        mid_value = fit.predict([row["midpoint"]], "ssri")[0]
        assert mid_value == pytest.approx((row["bottom"] + row["top"]) / 2, abs=1e-9)
    print(f"midpoint CI covered the planted 0.6 in {covered} of 10 sweeps")
    assert covered >= 8


def test_logistic_gives_reasons_not_exceptions():
    """Flat data, 3 levels and a midpoint beyond the tested range each give fitted=False and a reason (no
    exception); flat fits report no parameters, an out-of-range fit keeps its estimate, none has a CI."""
    rng = np.random.default_rng(6)
    flat = sweep(rng, lambda x: 0.0, levels=tuple(np.linspace(0, 1, 7)))
    three = sweep(rng, lambda x: dr.logistic4(x, **PLANTED), levels=(0.0, 0.5, 1.0))
    beyond = sweep(rng, lambda x: dr.logistic4(x, 20, 90, 1.6, -6), levels=tuple(np.linspace(0, 1, 7)),
                   sd_noise=0.2)
    const = flat.assign(value=5.0)
    reasons, mids = {}, {}
    for name, df in {"flat": flat, "three": three, "beyond": beyond, "const": const}.items():
        row = dr.fit_logistic(df, "pruning.fraction", "accuracy", n_resamples=20).table.iloc[0]
        assert not row["fitted"], name
        assert np.isnan(row["midpoint_ci_low"]) and np.isnan(row["midpoint_ci_high"]), name
        reasons[name], mids[name] = row["reason"], row["midpoint"]
    assert np.isnan(mids["flat"]) and np.isnan(mids["three"])  # no arbitrary parameters reported
    assert mids["beyond"] > 1.0  # kept for inspection: the planted 1.6 lies beyond the tested [0, 1]
    assert reasons["flat"].startswith("flat response")
    assert reasons["const"].startswith("flat response")
    assert reasons["three"].startswith("too few levels: 3")
    assert reasons["beyond"].startswith("midpoint") and "outside" in reasons["beyond"]


def test_logistic_non_convergence_is_a_reason(monkeypatch):
    """When least squares fails from every start value (curve_fit raising RuntimeError, as scipy does after
    maxfev evaluations) the arm gets fitted=False and a 'did not converge' reason carrying scipy's message."""
    from scipy import optimize

    def fail(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev = 4000.")

    monkeypatch.setattr(optimize, "curve_fit", fail)
    df = sweep(np.random.default_rng(12), lambda x: dr.logistic4(x, **PLANTED), levels=tuple(np.linspace(0, 1, 7)))
    row = dr.fit_logistic(df, "pruning.fraction", "accuracy", n_resamples=10).table.iloc[0]
    assert not row["fitted"]
    assert row["reason"].startswith("did not converge: Optimal parameters not found")
    assert np.isnan(row["midpoint"])


def test_cliff_location_recovered():
    """A planted step between 0.5 and 0.625 (a drop of 40 over 9 levels) is found there, the rate equals
    the hand-computed difference of the means / 0.125, its CI covers the planted -320 per unit, and almost
    every bootstrap resample agrees on the location."""
    levels = tuple(np.linspace(0.0, 1.0, 9))
    df = sweep(np.random.default_rng(7), lambda x: 80.0 - 40.0 * (x > 0.55), levels=levels)
    res = dr.cliff(df, "pruning.fraction", "accuracy", n_resamples=300, seed=2)
    row = res.table.iloc[0]
    assert (row["level_from"], row["level_to"]) == (0.5, 0.625)
    means = df.groupby("pruning.fraction")["value"].mean()
    assert row["rate"] == pytest.approx((means[0.625] - means[0.5]) / 0.125, abs=1e-9)
    assert row["rate_ci_low"] < -320.0 < row["rate_ci_high"]
    assert row["location_share"] > 0.95
    assert row["location_ci_low"] == row["location_ci_high"] == pytest.approx(0.5625)


def test_figure_returns_figure_with_curve():
    """The figure is a matplotlib Figure with one axis, the points, the fitted curve and the midpoint."""
    from matplotlib.figure import Figure

    df = sweep(np.random.default_rng(8), lambda x: dr.logistic4(x, **PLANTED), levels=tuple(np.linspace(0, 1, 7)))
    fig = dr.plot_dose_response(df, "pruning.fraction", "accuracy", n_resamples=20)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels and "midpoint" in labels[0]


def test_figure_joins_the_means_of_an_arm_without_a_curve():
    """An arm with no fitted logistic (here a flat one) has its means joined by a line through every
    level, so it stays visible where another arm's markers cover its points; a fitted arm has its
    curve instead."""
    levels = tuple(np.linspace(0, 1, 7))
    rng = np.random.default_rng(10)
    df = pd.concat([
        sweep(rng, lambda x: dr.logistic4(x, **PLANTED), levels=levels, arm="ssri"),
        sweep(rng, lambda x: 0.0 * x + 90.0, levels=levels, arm="ketamine"),
    ])
    fig = dr.plot_dose_response(df, "pruning.fraction", "accuracy", n_resamples=20)
    means = df[df["arm"] == "ketamine"].groupby("pruning.fraction")["value"].mean()
    joined = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == ":"]
    assert len(joined) == 1  # the flat arm's, not the fitted one's
    np.testing.assert_allclose(joined[0].get_xdata(), means.index.to_numpy())
    np.testing.assert_allclose(joined[0].get_ydata(), means.to_numpy())


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"),
    [
        (lambda d: d.drop(columns="patient"), {}, ValueError, "missing column.*patient"),
        (lambda d: d.drop(columns="pruning.fraction"), {}, ValueError, "missing column.*pruning.fraction"),
        (lambda d: d.assign(**{"pruning.fraction": d["pruning.fraction"].astype(str)}), {}, ValueError,
         "level column 'pruning.fraction' must be numeric"),
        (lambda d: d.iloc[:0], {}, ValueError, "empty"),
        (lambda d: d, {"metric": "nope"}, ValueError, "no rows for metric 'nope'"),
        (lambda d: pd.concat([d, d.assign(condition="clean")]), {}, ValueError, "several condition values"),
        (lambda d: pd.concat([d, d.assign(noise_sigma=1.0)]).fillna({"noise_sigma": 0.0}), {}, ValueError,
         "several rows per arm, patient.*noise_sigma"),
        (lambda d: d.to_dict(), {}, TypeError, "must be a pandas DataFrame"),
    ],
)
def test_bad_input_raises_naming_the_problem(mutate, kwargs, exc, match):
    """Missing columns, a non-numeric level, an empty frame, an unknown metric, mixed conditions and
    duplicate rows raise with a message that names the problem, in every entry point."""
    df = sweep(np.random.default_rng(9), lambda x: x, n_patients=3)
    bad = mutate(df)
    args = {"level": "pruning.fraction", "metric": "accuracy", **kwargs}
    for fn in (dr.level_summary, dr.trend_test, dr.fit_logistic, dr.cliff):
        with pytest.raises(exc, match=match):
            fn(bad, **args)


def test_cliff_as_the_largest_fall_with_a_value_before_the_first_level():
    """Ch02 fact 9: with scale = "change" the cliff is the level with the largest fall of the mean
    from the previous level, located at that level, not the steepest rate (uneven spacing tells them
    apart); with before = 100 the first level's own fall from 100 counts too."""
    import pandas as pd

    from analysis.dose_response import cliff

    levels = [0.0, 0.5, 0.9, 0.95]
    means = [90.0, 70.0, 50.0, 40.0]  # falls 20 (over 0.5), 20 (over 0.4), 10 (over 0.05)
    rows = [{"patient": p, "arm": "a", "metric": "accuracy", "x": lv, "value": m + d}
            for p, d in enumerate([-1.0, 1.0]) for lv, m in zip(levels, means)]
    df = pd.DataFrame(rows)
    steepest = cliff(df, "x", "accuracy", n_resamples=0).table.iloc[0]
    assert (steepest.level_from, steepest.level_to) == (0.9, 0.95)  # rate -200 per unit
    fall = cliff(df, "x", "accuracy", scale="change", n_resamples=0).table.iloc[0]
    assert (fall.level_to, fall.location, fall.change) == (0.5, 0.5, -20.0)  # first of the two equal falls
    first = cliff(df.assign(value=df.value - 15), "x", "accuracy", scale="change", before=100.0,
                  n_resamples=0).table.iloc[0]
    assert np.isnan(first.level_from) and first.level_to == 0.0 and first.change == -25.0
    with pytest.raises(ValueError, match="before needs"):
        cliff(df, "x", "accuracy", before=100.0)
