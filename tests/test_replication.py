"""Tests of :mod:`analysis.replication`: the Wilson interval, the replication share and the smallest cohort.

The claim evaluators here are small synthetic callables (never the paper's), so each expected
number can be derived by hand or from a closed form (statsmodels' Wilson interval, the power of a
one-sample t test from the noncentral t distribution).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from analysis import replication as rp


def test_wilson_equals_statsmodels():
    """wilson_ci equals statsmodels' proportion_confint(method="wilson") within 1e-12 for every k <= n <= 60
    at three confidence levels, including k = 0 and k = n."""
    n = np.repeat(np.arange(1, 61), np.arange(2, 62))
    k = np.concatenate([np.arange(m + 1) for m in range(1, 61)])
    for conf in (0.9, 0.95, 0.99):
        low, high = rp.wilson_ci(k, n, conf)
        ref_low, ref_high = proportion_confint(k, n, alpha=1 - conf, method="wilson")
        np.testing.assert_allclose(low, ref_low, rtol=0, atol=1e-12)
        np.testing.assert_allclose(high, ref_high, rtol=0, atol=1e-12)
    low, high = rp.wilson_ci(0, 0)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize(("k", "n", "match"), [(3, 2, "successes <= n"), (-1, 4, "successes <= n"),
                                                (1.5, 4, "whole numbers"), (1, float("nan"), "finite")])
def test_wilson_bad_counts(k, n, match):
    """Impossible counts raise ValueError naming the rule broken."""
    with pytest.raises(ValueError, match=match):
        rp.wilson_ci(k, n)


def hand_built():
    """Four cohorts of two patients; a decide() whose answers are fixed per cohort."""
    df = pd.DataFrame({"cohort": np.repeat([0, 1, 2, 3], 2), "patient": [0, 1] * 4, "value": np.arange(8.0)})
    answers = {
        0: {"A": True, "B": True},
        1: {"A": True, "B": False},
        2: {"A": False},  # B missing -> not testable
        3: {"A": None, "B": np.bool_(True)},
    }
    seen = []

    def decide(frame):
        cohort = int(frame["cohort"].iloc[0])
        assert frame["cohort"].nunique() == 1 and len(frame) == 2
        seen.append(cohort)
        return answers[cohort]

    return df, decide, seen


def test_replication_share_hand_built():
    """On a hand-built 4-cohort example: A holds in 2 of 3 testable cohorts, B in 2 of 3 (one cohort lacks
    it), each with statsmodels' Wilson interval for 2/3; decide() is called once per cohort."""
    df, decide, seen = hand_built()
    rep = rp.replication_table(df, decide)
    assert sorted(seen) == [0, 1, 2, 3]
    t = rep.table.set_index("claim")
    ref_low, ref_high = proportion_confint(2, 3, method="wilson")
    for claim in ("A", "B"):
        assert t.loc[claim, ["n_cohorts", "n_testable", "n_hold"]].tolist() == [4, 3, 2]
        assert t.loc[claim, "share"] == pytest.approx(2 / 3, abs=1e-15)
        assert t.loc[claim, "conf_int_low"] == pytest.approx(ref_low, abs=1e-12)
        assert t.loc[claim, "conf_int_high"] == pytest.approx(ref_high, abs=1e-12)
    assert rep.decisions.loc[2, "B"] is None and rep.decisions.loc[3, "A"] is None
    assert "Wilson" in rep.summary()


def test_replication_bad_input():
    """A missing cohort column, an empty frame, a non-mapping or non-bool answer and a non-callable decide
    raise with the problem named; an exception inside decide() names the cohort."""
    df, decide, _ = hand_built()
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cohort'\]"):
        rp.replication_table(df.drop(columns="cohort"), decide)
    with pytest.raises(ValueError, match="empty"):
        rp.replication_table(df.iloc[:0], decide)
    with pytest.raises(TypeError, match="must return a mapping"):
        rp.replication_table(df, lambda f: [True])
    with pytest.raises(TypeError, match="expected bool or None"):
        rp.replication_table(df, lambda f: {"A": 1})
    with pytest.raises(TypeError, match="decide must be callable"):
        rp.replication_table(df, "not a function")
    with pytest.raises(ZeroDivisionError) as info:
        rp.replication_table(df, lambda f: {"A": 1 / 0})
    assert "cohort 0" in " ".join(getattr(info.value, "__notes__", []))


EFFECT = 0.5  # planted standardized mean of the pool
SIZES = [8, 20, 45, 80]


def t_power(n, d=EFFECT, alpha=0.05):
    """Power of the two-sided one-sample t test (noncentral t), the reference for the drawn shares."""
    crit = stats.t.isf(alpha / 2, n - 1)
    nc = d * np.sqrt(n)
    return stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)


def test_smallest_cohort_finds_planted_size():
    """A claim 'the mean differs from 0 (t test p < 0.05)' on a pool of 2000 patients with effect 0.5 has
    power 0.24, 0.56, 0.92, 1.00 at sizes 8, 20, 45, 80 (noncentral t): the smallest size reaching 80 % is 45,
    each drawn share is within 0.1 of the power, and a claim that is never true is 'not reached'."""
    rng = np.random.default_rng(11)
    values = rng.normal(0.0, 1.0, 2000)
    values = (values - values.mean()) / values.std() + EFFECT  # pool effect exactly 0.5 SD
    pool = pd.DataFrame({"patient": np.arange(2000), "value": values})
    power = t_power(np.array(SIZES))
    assert power[1] < 0.8 < power[2]  # the planted answer is unambiguous

    def decide(frame):
        assert frame["patient"].tolist() == list(range(len(frame)))
        return {"effect": bool(stats.ttest_1samp(frame["value"], 0.0).pvalue < 0.05), "never": False}

    res = rp.smallest_cohort(pool, decide, SIZES, target=0.8, n_resamples=150, seed=3)
    assert res.smallest_size["effect"] == 45
    assert np.isnan(res.smallest_size["never"])
    share = res.curve[res.curve["claim"] == "effect"].set_index("size")["share"]
    np.testing.assert_allclose(share.loc[SIZES].to_numpy(), power, atol=0.1)
    fig = res.plot()
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 3  # two claims + target line


def test_smallest_cohort_pools_cohorts_and_renumbers():
    """With a cohort column, patients are (cohort, patient) pairs: 2 cohorts of 5 give a pool of 10; drawn
    cohorts hold distinct pool patients without replacement, renumbered 0..n-1, cohort set to 0."""
    df = pd.DataFrame({"cohort": np.repeat([0, 1], 10), "patient": np.tile(np.repeat(np.arange(5), 2), 2),
                       "value": np.repeat(np.arange(10.0), 2)})
    seen = []

    def decide(frame):
        seen.append(frame)
        return {"c": True}

    res = rp.smallest_cohort(df, decide, [10], n_resamples=3, seed=0)
    assert res.pool_size == 10
    for frame in seen:
        assert sorted(frame["value"].unique()) == list(np.arange(10.0))  # all 10 distinct patients
        assert sorted(frame["patient"].unique()) == list(range(10)) and set(frame["cohort"]) == {0}
        assert (frame.groupby("patient")["value"].nunique() == 1).all()
    with pytest.raises(ValueError, match="exceeds the 10 patients"):
        rp.smallest_cohort(df, decide, [11])
    with pytest.raises(ValueError, match="sizes is empty"):
        rp.smallest_cohort(df, decide, [])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['patient'\]"):
        rp.smallest_cohort(df.drop(columns="patient"), decide, [2])
    with pytest.raises(ValueError, match="target"):
        rp.smallest_cohort(df, decide, [2], target=1.5)
