"""Tests of analysis.longitudinal and analysis.survival on data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis._data import REQUIRED_COLUMNS
from analysis.longitudinal import relapse_gee, washout_mixedlm
from analysis.survival import cox, kaplan_meier, logrank, time_to_relapse

NAN = float("nan")
COLS = list(REQUIRED_COLUMNS)
DURATIONS = (25.0, 50.0, 100.0, 150.0, 200.0, 300.0)


def relapse_frame(probs: dict[str, float], n_patients: int, seed: int) -> pd.DataFrame:
    """Wash-out rows: `relapsed` ~ Bernoulli(prob of arm, shifted by a patient effect) and the
    last-step biased accuracy; no effect of duration."""
    rng = np.random.default_rng(seed)
    rows = []
    patient_shift = rng.normal(0, 0.5, n_patients)
    for arm, prob in probs.items():
        logit = math.log(prob / (1 - prob)) if 0 < prob < 1 else None
        for p in range(n_patients):
            for d in DURATIONS:
                if logit is None:
                    y = float(prob)
                else:
                    y = float(rng.random() < 1 / (1 + math.exp(-(logit + patient_shift[p]))))
                rows.append((p, arm, "washout", "relapsed", "", NAN, d, 50.0, y))
    return pd.DataFrame(rows, columns=COLS)


def test_gee_recovers_a_planted_arm_effect():
    """Relapse 0.8 vs 0.2: the arm log-odds ratio is significant, positive and its CI covers
    the planted log(16); duration (no planted effect) has a CI covering 0."""
    df = relapse_frame({"a": 0.2, "b": 0.8}, n_patients=40, seed=1)
    m = relapse_gee(df)
    assert m.fitted, m.message
    par = m.params.set_index("term")
    arm = par.loc["arm[b]"]
    assert arm["pvalue"] < 0.001
    assert arm["conf_int_low"] < math.log(16) < arm["conf_int_high"]
    assert arm["odds_ratio"] == pytest.approx(math.exp(arm["coef"]))
    dur = par.loc["duration"]
    assert dur["conf_int_low"] < 0 < dur["conf_int_high"]
    assert m.n_groups == 40 and m.n_obs == 40 * 2 * 6
    assert "GEE" in m.summary()


def test_gee_reports_separation_instead_of_nonsense():
    """An arm that never relapses is left out with a note; if no arm has both outcomes the
    model is not fitted and says why."""
    df = relapse_frame({"ket": 0.0, "a": 0.3, "b": 0.7}, n_patients=20, seed=2)
    m = relapse_gee(df)
    assert m.fitted
    assert any(n.startswith("ket left out") and "never relapsed" in n for n in m.notes)
    assert not any("ket" in t for t in m.params["term"])
    none = relapse_gee(relapse_frame({"ket": 0.0, "ssri": 1.0}, n_patients=5, seed=3))
    assert not none.fitted
    assert "no arm has both" in none.message
    assert "NOT FITTED" in none.summary()
    assert none.summary_frame().empty


def washout_frame(n_patients: int, seed: int, constant: bool = False) -> pd.DataFrame:
    """Last-step biased accuracy = 92 (ket) / 42 (ssri) + patient intercept (sd 3) + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    intercept = rng.normal(0, 3, n_patients)
    for arm, mean in {"ket": 92.0, "ssri": 42.0}.items():
        for p in range(n_patients):
            for d in DURATIONS:
                v = 50.0 if constant else mean + intercept[p] + rng.normal(0, 1)
                rows.append((p, arm, "washout", "accuracy", "biased", NAN, d, 50.0, v))
    return pd.DataFrame(rows, columns=COLS)


def test_mixedlm_recovers_planted_means_and_random_intercept():
    """The arm contrast estimates the planted -50 pp, no duration slope, and a positive
    random-intercept variance near the planted 9."""
    m = washout_mixedlm(washout_frame(30, seed=4))
    assert m.fitted, m.message
    par = m.params.set_index("term")
    assert par.loc["arm[ssri]", "coef"] == pytest.approx(-50.0, abs=1.0)
    assert par.loc["Intercept", "coef"] == pytest.approx(92.0, abs=2.0)
    assert par.loc["duration", "conf_int_low"] < 0 < par.loc["duration", "conf_int_high"]
    assert 3.0 < m.extra["random-intercept variance"] < 20.0
    assert m.extra["residual variance"] == pytest.approx(1.0, abs=0.3)


def test_mixedlm_not_fitted_on_constant_data():
    """Identical accuracy everywhere: the model says there is nothing to model."""
    m = washout_mixedlm(washout_frame(4, seed=5, constant=True))
    assert not m.fitted and "identical" in m.message


def trajectory_frame(trajectories: dict[tuple[int, str, float], list[float]]) -> pd.DataFrame:
    rows = []
    for (p, arm, d), accs in trajectories.items():
        for step, acc in enumerate(accs):
            rows.append((p, arm, "washout", "accuracy", "biased", NAN, d, float(step), acc))
    return pd.DataFrame(rows, columns=COLS)


def test_time_to_relapse_first_crossing_and_censoring():
    """Time = first step with accuracy < threshold (step 0 counts); else censored at the last."""
    df = trajectory_frame(
        {
            (0, "a", 25.0): [90, 80, 70, 59, 40, 70],
            (1, "a", 25.0): [90, 85, 80, 75, 70, 65],
            (2, "a", 25.0): [55, 50, 45, 40, 35, 30],
            (0, "b", 25.0): [90, 61, 60, 60, 60, 60],
        }
    )
    ttr = time_to_relapse(df).set_index(["patient", "arm"])
    assert ttr.loc[(0, "a"), ["time", "event"]].tolist() == [3.0, 1]
    assert ttr.loc[(1, "a"), ["time", "event"]].tolist() == [5.0, 0]
    assert ttr.loc[(2, "a"), ["time", "event"]].tolist() == [0.0, 1]
    assert ttr.loc[(0, "b"), ["time", "event"]].tolist() == [5.0, 0]  # 60 is not below 60
    strict = time_to_relapse(df, threshold=60.5).set_index(["patient", "arm"])
    assert strict.loc[(0, "b"), ["time", "event"]].tolist() == [2.0, 1]
    via_protocol = time_to_relapse(df, {"longitudinal": {"relapse_threshold": 86.0}})
    assert via_protocol.set_index(["patient", "arm"]).loc[(1, "a"), "time"] == 1.0  # 85 < 86


def ttr_frame(arm_times: dict[str, tuple[list[float], list[int]]]) -> pd.DataFrame:
    rows = []
    for arm, (times, events) in arm_times.items():
        for i, (t, e) in enumerate(zip(times, events, strict=True)):
            rows.append(
                {"patient": i, "arm": arm, "maintenance_epochs": 25.0, "time": t, "event": e}
            )
    return pd.DataFrame(rows)


def test_kaplan_meier_by_hand():
    """Product-limit S(t) = Π(1 - d/n) and Greenwood SE = S·sqrt(Σ d/(n(n-d))) by hand."""
    times = [2, 3, 3, 5, 7, 7, 9]
    events = [1, 1, 0, 1, 0, 1, 0]
    km = kaplan_meier(ttr_frame({"a": (times, events)}))
    tab = km.table.set_index("time")
    # t=2: n=7,d=1 ; t=3: n=6,d=1,c=1 ; t=5: n=4,d=1 ; t=7: n=3,d=1,c=1 ; t=9: n=1,c=1
    s2 = 6 / 7
    s3 = s2 * 5 / 6
    s5 = s3 * 3 / 4
    s7 = s5 * 2 / 3
    expected = {2: s2, 3: s3, 5: s5, 7: s7, 9: s7}
    for t, s in expected.items():
        assert tab.loc[t, "survival"] == pytest.approx(s, abs=1e-12)
    assert tab.loc[3, "n_at_risk"] == 6 and tab.loc[3, "n_censored"] == 1
    g7 = 1 / (7 * 6) + 1 / (6 * 5) + 1 / (4 * 3) + 1 / (3 * 2)
    assert tab.loc[7, "std_err"] == pytest.approx(s7 * math.sqrt(g7), rel=1e-10)
    w = 1.959963984540054 * math.sqrt(g7) / abs(math.log(s7))
    assert tab.loc[7, "conf_int_low"] == pytest.approx(s7 ** math.exp(w), rel=1e-8)
    assert tab.loc[7, "conf_int_high"] == pytest.approx(s7 ** math.exp(-w), rel=1e-8)
    med = km.medians.set_index("arm").loc["a", "median"]
    assert med == 7.0  # first time with S <= 0.5 (S(5)=0.536, S(7)=0.357)
    assert km.survival_at("a", 4.0) == pytest.approx(s3)


def test_kaplan_meier_arm_without_events_stays_at_one():
    """No event in an arm: S = 1 throughout and the median is not reached."""
    km = kaplan_meier(ttr_frame({"ket": ([50.0] * 4, [0] * 4), "b": ([1.0, 2.0], [1, 1])}))
    ket = km.table[km.table["arm"] == "ket"]
    assert (ket["survival"] == 1.0).all()
    assert math.isnan(km.medians.set_index("arm").loc["ket", "median"])
    assert "not reached" in km.summary()


def _logrank_by_hand(t1, e1, t2, e2) -> float:
    t = np.concatenate([t1, t2])
    e = np.concatenate([e1, e2])
    g = np.concatenate([np.zeros(len(t1)), np.ones(len(t2))])
    o_minus_e, var = 0.0, 0.0
    for s in np.unique(t[e == 1]):
        at_risk = t >= s
        n, n1 = at_risk.sum(), (at_risk & (g == 0)).sum()
        d = ((t == s) & (e == 1)).sum()
        d1 = ((t == s) & (e == 1) & (g == 0)).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    return o_minus_e**2 / var


def test_logrank_matches_hand_computation():
    """Two-group log-rank chi-square = (O1 - E1)² / V summed over event times."""
    t1, e1 = [1.0, 3.0, 4.0, 6.0, 8.0, 9.0], [1, 1, 0, 1, 1, 0]
    t2, e2 = [2.0, 5.0, 7.0, 10.0, 12.0, 12.0], [1, 0, 1, 1, 0, 0]
    lr = logrank(ttr_frame({"a": (t1, e1), "b": (t2, e2)}))
    chi2 = _logrank_by_hand(np.array(t1), np.array(e1), np.array(t2), np.array(e2))
    assert lr.overall["statistic"].iloc[0] == pytest.approx(chi2, rel=1e-8)
    from scipy.stats import chi2 as chi2_dist

    assert lr.overall["pvalue"].iloc[0] == pytest.approx(chi2_dist.sf(chi2, 1), rel=1e-8)
    assert len(lr.pairwise) == 1


def test_logrank_with_no_events_says_so():
    """No relapse anywhere: the test is reported as undefined, not as a number."""
    lr = logrank(ttr_frame({"a": ([50.0] * 3, [0] * 3), "b": ([50.0] * 3, [0] * 3)}))
    assert math.isnan(lr.overall["pvalue"].iloc[0])
    assert "no relapse" in lr.overall["note"].iloc[0]


def test_cox_recovers_a_planted_hazard_ratio_and_drops_arms_without_events():
    """Exponential times with hazard ratio 3 (b vs a): the HR CI covers 3; an arm without
    relapses is left out with a note rather than given a huge coefficient."""
    rng = np.random.default_rng(6)
    n = 300
    ta = rng.exponential(1 / 0.05, n)
    tb = rng.exponential(1 / 0.15, n)
    cens = 50.0
    frame = ttr_frame(
        {
            "a": (np.minimum(ta, cens).tolist(), (ta < cens).astype(int).tolist()),
            "b": (np.minimum(tb, cens).tolist(), (tb < cens).astype(int).tolist()),
            "ket": ([cens] * 20, [0] * 20),
        }
    )
    frame["maintenance_epochs"] = np.tile(DURATIONS, len(frame) // 6 + 1)[: len(frame)]
    m = cox(frame)
    assert m.fitted, m.message
    assert m.reference == "a"
    row = m.params.set_index("term").loc["arm[b]"]
    assert row["hr_conf_int_low"] < 3.0 < row["hr_conf_int_high"]
    assert row["pvalue"] < 1e-6
    assert any(n.startswith("ket left out") for n in m.notes)
    assert "ket" not in " ".join(m.params["term"])


def test_cox_and_time_to_relapse_reject_bad_input():
    """Wrong types are TypeErrors; missing data or columns are ValueErrors."""
    with pytest.raises(TypeError):
        cox([1, 2, 3])
    with pytest.raises(ValueError, match="missing column"):
        kaplan_meier(pd.DataFrame({"time": [1.0]}))
    with pytest.raises(ValueError, match="wash-out"):
        time_to_relapse(pd.DataFrame(columns=COLS))
    none = cox(ttr_frame({"a": ([5.0, 5.0], [0, 0])}))
    assert not none.fitted and "no relapse" in none.message


def test_cox_with_every_relapse_tied_at_one_step_is_not_fitted():
    """All relapses at step 0 in every arm: the partial likelihood is flat and the model says
    so instead of printing zero coefficients with zero standard errors."""
    frame = ttr_frame({"a": ([0.0] * 6, [1] * 6), "b": ([0.0] * 6, [1] * 6)})
    frame["patient"] = np.tile(np.arange(3), 4)
    frame["maintenance_epochs"] = np.repeat([5.0, 10.0], 6)
    m = cox(frame)
    assert not m.fitted and "degenerate" in m.message
