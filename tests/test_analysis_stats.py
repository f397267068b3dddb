"""Tests of analysis.summaries and analysis.stats against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis._data import REQUIRED_COLUMNS
from analysis.stats import (
    cohen_dz,
    compare_arms,
    mauchly,
    paired_test,
    paired_values,
    rank_biserial,
)
from analysis.summaries import bootstrap_ci, describe, relapse_probability, relapse_ranking, t_ci
from analysis.synthetic import make_results

NAN = float("nan")


def long_frame(
    values: dict[str, np.ndarray], metric: str = "accuracy", condition: str = "combined"
) -> pd.DataFrame:
    """A minimal tidy results table: one value per patient and arm (untreated = pruned)."""
    rows = []
    for arm, vals in values.items():
        phase = "pruned" if arm == "untreated" else "acute"
        for p, v in enumerate(vals):
            rows.append((p, arm, phase, metric, condition, NAN, NAN, NAN, float(v)))
    return pd.DataFrame(
        rows,
        columns=list(REQUIRED_COLUMNS),
    )


# ----------------------------------------------------------------------------- summaries


def test_t_ci_matches_formula():
    """t interval = mean ± t_{0.975, n-1} · s / sqrt(n) with s the ddof=1 SD."""
    x = np.random.default_rng(0).normal(10.0, 2.0, size=9)
    half = sps.t.ppf(0.975, 8) * x.std(ddof=1) / 3.0
    lo, hi = t_ci(x)
    assert lo == pytest.approx(x.mean() - half, abs=1e-12)
    assert hi == pytest.approx(x.mean() + half, abs=1e-12)
    assert all(math.isnan(v) for v in t_ci(np.array([1.0])))
    assert t_ci(np.full(4, 2.5)) == (2.5, 2.5)


def test_bootstrap_ci_is_seeded_degenerate_safe_and_close_to_t():
    """BCa bootstrap ≈ t interval for normal data; same seed, same interval; constants exact."""
    x = np.random.default_rng(1).normal(0.0, 1.0, size=60)
    b1 = bootstrap_ci(x, n_resamples=999, seed=3)
    b2 = bootstrap_ci(x, n_resamples=999, seed=3)
    assert b1 == b2
    lo, hi = t_ci(x)
    width = hi - lo
    assert abs(b1[0] - lo) < 0.2 * width and abs(b1[1] - hi) < 0.2 * width
    assert bootstrap_ci(np.full(5, 7.0)) == (7.0, 7.0)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([1.0])))


def test_describe_matches_numpy_and_uses_last_washout_step():
    """describe's mean/SD(ddof=0)/n equal numpy's; wash-out cells are the last step only."""
    df = make_results(n_patients=5, seed=4)
    d = describe(df, n_resamples=99).frame
    row = d[
        (d["arm"] == "ssri")
        & (d["metric"] == "accuracy")
        & (d["condition"] == "biased")
        & (d["phase"] == "acute")
    ].iloc[0]
    raw = df[(df["arm"] == "ssri") & (df["phase"] == "acute") & (df["condition"] == "biased")]
    assert row["n"] == 5
    assert row["mean"] == pytest.approx(raw["value"].mean(), abs=1e-12)
    assert row["sd"] == pytest.approx(raw["value"].std(ddof=0), abs=1e-12)
    assert row["ci_t_low"] < row["mean"] < row["ci_t_high"]
    wash = d[(d["phase"] == "washout") & (d["metric"] == "accuracy")]
    assert len(wash) == 3 * 6  # arms x durations, one cell each (no per-step cells)
    last = df[
        (df["phase"] == "washout")
        & (df["metric"] == "accuracy")
        & (df["step"] == 50)
        & (df["arm"] == "ketamine")
        & (df["maintenance_epochs"] == 25)
    ]
    got = wash[(wash["arm"] == "ketamine") & (wash["maintenance_epochs"] == 25)].iloc[0]
    assert got["mean"] == pytest.approx(last["value"].mean(), abs=1e-12)
    assert "ddof=0" in describe(df, phases=["acute"], metrics=["gain"], n_resamples=9).summary()


def test_describe_rejects_bad_arguments():
    """Unknown phases or arms and bad confidence levels are ValueErrors; strings TypeErrors."""
    df = make_results(n_patients=2)
    with pytest.raises(ValueError, match="phase"):
        describe(df, phases=["nope"])
    with pytest.raises(ValueError, match="arm"):
        describe(df, arms=["nope"])
    with pytest.raises(ValueError, match="confidence"):
        describe(df, confidence=1.5)
    with pytest.raises(TypeError):
        describe(df, phases="acute")


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_relapse_probability_wilson_interval_by_formula():
    """Counts per arm and duration, and the Wilson score interval by its closed form."""
    df = make_results(n_patients=6, seed=5)
    rel = df[(df["metric"] == "relapsed")]
    rp = relapse_probability(df).frame.set_index("arm")
    for arm in ["ketamine", "ssri", "neurosteroid"]:
        vals = rel.loc[rel["arm"] == arm, "value"].to_numpy()
        k, n = int(vals.sum()), vals.size
        lo, hi = _wilson(k, n)
        assert rp.loc[arm, "relapsed"] == k and rp.loc[arm, "n"] == n == 36
        assert rp.loc[arm, "probability"] == pytest.approx(100 * k / n)
        assert rp.loc[arm, "conf_int_low"] == pytest.approx(100 * lo, abs=1e-9)
        assert rp.loc[arm, "conf_int_high"] == pytest.approx(100 * hi, abs=1e-9)
        per_patient = 100 * rel[rel["arm"] == arm].groupby("patient")["value"].mean()
        assert rp.loc[arm, "patient_sd"] == pytest.approx(per_patient.std(ddof=0))
    by = relapse_probability(df, by_duration=True).frame
    assert len(by) == 3 * 6 and set(by["n"]) == {6}
    assert "Wilson" in relapse_probability(df).summary()


def _washouts(rates: dict[str, dict[str, float]], n_patients: int = 12, seed: int = 3) -> pd.DataFrame:
    """Wash-out verdicts of several labels: arm a relapses with probability rates[label][a] after
    each of 6 durations of each patient."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([
        dict(patient=p, arm=a, phase="washout", metric="relapsed", condition="", noise_sigma=np.nan,
             maintenance_epochs=float(d), step=50.0, value=float(rng.random() < q), label=label)
        for label, per_arm in rates.items() for a, q in per_arm.items()
        for p in range(n_patients) for d in (25, 50, 100, 150, 200, 300)])


def test_relapse_probability_by_label_counts_each_washout_apart():
    """by_label: one row per arm and wash-out label, each counting only its own verdicts."""
    df = _washouts({"own": {"ketamine": 0.1, "ssri": 0.9}, "equal": {"ketamine": 0.5, "ssri": 0.5}})
    rp = relapse_probability(df, by_label=True).frame.set_index(["arm", "label"])
    for (arm, label), r in rp.iterrows():
        vals = df.loc[(df["arm"] == arm) & (df["label"] == label), "value"]
        assert r["relapsed"] == vals.sum() and r["n"] == len(vals) == 72
    assert len(rp) == 4
    with pytest.raises(ValueError, match="label"):
        relapse_probability(df.drop(columns="label"), by_label=True)


def test_relapse_ranking_recovers_a_planted_order_and_its_wilcoxon_matches_scipy():
    """A planted order (ketamine < neurosteroid < ssri under 'own', reversed under 'fast') is what
    the ranking reports; the adjacent pairs' p-values equal scipy's Wilcoxon on per-patient shares;
    same_order says which labels keep the reference's ranking."""
    df = _washouts({"own": {"ketamine": 0.05, "ssri": 0.9, "neurosteroid": 0.4},
                    "fast": {"ketamine": 0.9, "ssri": 0.05, "neurosteroid": 0.4}})
    r = relapse_ranking(df)
    assert r.orders["own"] == (("ketamine",), ("neurosteroid",), ("ssri",))
    assert r.orders["fast"] == (("ssri",), ("neurosteroid",), ("ketamine",))
    assert r.same_order("own") == {"fast": False, "own": True}
    per = df.pivot_table(index=["label", "patient"], columns="arm", values="value", aggfunc="mean") * 100
    for _, row in r.frame.iterrows():
        sub = per.loc[row["label"]]
        ref = sps.wilcoxon(sub[row["higher"]] - sub[row["lower"]])  # zero differences dropped
        assert row["pvalue"] == pytest.approx(ref.pvalue, rel=1e-12)
        assert row["difference"] == pytest.approx((sub[row["higher"]] - sub[row["lower"]]).mean())
    assert (r.frame["pvalue"] < 0.05).all()  # 12 patients, planted gaps of 0.35-0.5
    assert "ketamine < neurosteroid < ssri" in r.summary()


def test_relapse_ranking_reports_ties_and_refuses_bad_input():
    """Equal probabilities are a tie ('='), with p = 1 when every patient ties; one arm or no labels
    is refused with a message."""
    df = _washouts({"never": {"ketamine": 0.0, "ssri": 0.0}})
    r = relapse_ranking(df)
    assert r.orders["never"] == (("ketamine", "ssri"),)
    assert r.frame.loc[0, "relation"] == "=" and r.frame.loc[0, "pvalue"] == 1.0
    with pytest.raises(ValueError, match="two arms"):
        relapse_ranking(df[df["arm"] == "ketamine"])
    with pytest.raises(ValueError, match="label"):
        relapse_ranking(df.drop(columns="label"))
    with pytest.raises(ValueError, match="no 'label'|unknown|reference|labelled"):
        r.same_order("nope")


# ----------------------------------------------------------------------------- paired tests


def test_paired_t_matches_numpy_formula():
    """t = mean(d) / (sd(d, ddof=1)/sqrt(n)), two-sided p = 2·P(T_{n-1} > |t|)."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(5, 1, 11), rng.normal(4, 1, 11)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(11))
    stat, p, _ = paired_test(a, b, "paired_t")
    assert stat == pytest.approx(t, rel=1e-12)
    assert p == pytest.approx(2 * sps.t.sf(abs(t), 10), rel=1e-10)


def test_wilcoxon_exact_p_by_enumeration():
    """Exact signed-rank p equals the share of the 2^n sign flips with T+ as extreme."""
    d = np.array([0.3, -1.1, 2.0, 2.6, 0.9, -0.4, 1.7, 3.1])
    ranks = sps.rankdata(np.abs(d))
    t_plus = ranks[d > 0].sum()
    dist = np.array(
        [
            sum(r for r, s in zip(ranks, signs, strict=True) if s)
            for signs in itertools.product([0, 1], repeat=len(d))
        ]
    )
    p_greater = np.mean(dist >= t_plus)
    centre = ranks.sum() / 2
    p_two = np.mean(np.abs(dist - centre) >= abs(t_plus - centre))
    _, p1, _ = paired_test(d, np.zeros_like(d), "wilcoxon", "greater")
    _, p2, _ = paired_test(d, np.zeros_like(d), "wilcoxon")
    assert p1 == pytest.approx(p_greater, abs=1e-12)
    assert p2 == pytest.approx(p_two, abs=1e-12)


def test_paired_tests_degenerate_cases():
    """All-zero differences give p = 1; a constant non-zero difference gives t = ±inf, p = 0."""
    x = np.array([1.0, 2.0, 3.0])
    assert paired_test(x, x, "wilcoxon")[1] == 1.0
    assert paired_test(x, x, "paired_t")[1] == 1.0
    stat, p, note = paired_test(x + 2.0, x, "paired_t")
    assert stat == math.inf and p == 0.0 and "constant" in note
    assert paired_test(x + 2.0, x, "paired_t", "less")[1] == 1.0
    with pytest.raises(ValueError, match="test"):
        paired_test(x, x, "anova")
    with pytest.raises(ValueError, match="equal length"):
        paired_test(x, x[:2])


def test_cohen_dz_and_its_noncentral_t_interval():
    """d_z = mean/sd(ddof=1); CI bounds solve nct.cdf(t; n-1, λ) = 0.975 / 0.025 and, for large
    n, agree with the normal approximation dz ± 1.96·sqrt(1/n + dz²/(2n))."""
    d = np.random.default_rng(7).normal(0.5, 1.0, size=15)
    dz, lo, hi = cohen_dz(d)
    assert dz == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)
    t = dz * math.sqrt(15)
    assert sps.nct.cdf(t, 14, lo * math.sqrt(15)) == pytest.approx(0.975, abs=1e-6)
    assert sps.nct.cdf(t, 14, hi * math.sqrt(15)) == pytest.approx(0.025, abs=1e-6)
    big = np.random.default_rng(8).normal(0.4, 1.0, size=400)
    dz, lo, hi = cohen_dz(big)
    se = math.sqrt(1 / 400 + dz**2 / 800)
    assert lo == pytest.approx(dz - 1.96 * se, abs=0.01)
    assert hi == pytest.approx(dz + 1.96 * se, abs=0.01)


def test_rank_biserial_by_hand():
    """r = (T+ - T-)/(T+ + T-) over ranks of |d| with zeros dropped: [1,-2,3,4,0] -> 0.6."""
    assert rank_biserial(np.array([1.0, -2.0, 3.0, 4.0, 0.0])) == pytest.approx(0.6)
    assert rank_biserial(np.array([1.0, 1.0, -1.0])) == pytest.approx(1 / 3)
    assert rank_biserial(np.zeros(4)) == 0.0
    batch = rank_biserial(np.array([[1.0, 2.0], [-1.0, -2.0]]))
    np.testing.assert_allclose(batch, [1.0, -1.0])


def test_mauchly_and_greenhouse_geisser_by_formula():
    """W = det(M)/(tr M/p)^p and ε = tr(M)²/(p·tr(M²)) for M = C'SC with orthonormal
    contrasts; sphericity is trivial for two conditions."""
    x = np.random.default_rng(9).normal(size=(12, 4)) * np.array([1.0, 1.0, 3.0, 0.5])
    c = np.array([[1, -1, 0, 0], [1, 1, -2, 0], [1, 1, 1, -3]], dtype=float).T
    c /= np.linalg.norm(c, axis=0)
    m = c.T @ np.cov(x, rowvar=False) @ c
    w_hand = np.linalg.det(m) / (np.trace(m) / 3) ** 3
    eps_hand = np.trace(m) ** 2 / (3 * np.trace(m @ m))
    chi2_hand = -(11 - (2 * 9 + 3 + 2) / 18) * math.log(w_hand)
    w, chi2, p, eps = mauchly(x)
    assert w == pytest.approx(w_hand, rel=1e-10)
    assert eps == pytest.approx(eps_hand, rel=1e-10)
    assert chi2 == pytest.approx(chi2_hand, rel=1e-10)
    assert p == pytest.approx(sps.chi2.sf(chi2_hand, 5), rel=1e-10)
    assert 1 / 3 <= eps <= 1.0
    assert mauchly(x[:, :2]) == (1.0, 0.0, 1.0, 1.0)


def _holm_by_hand(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    m = len(p)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def test_compare_arms_finds_a_planted_effect_and_holm_matches_hand():
    """Arm B = A + 3 (noise 1) is found by every test; C = A + noise is not; Holm by hand."""
    rng = np.random.default_rng(10)
    a = rng.normal(50, 5, 12)
    df = long_frame({"a": a, "b": a + 3 + rng.normal(0, 1, 12), "c": a + rng.normal(0, 1, 12)})
    cmp = compare_arms(df, "accuracy", "combined", "acute", n_resamples=199)
    om = cmp.omnibus.set_index("test")
    assert om.loc["friedman", "pvalue"] < 0.01
    assert om.loc["rm_anova", "pvalue"] < 0.01
    pw = cmp.pairwise.set_index(["arm_a", "arm_b", "test"])
    for test in ["wilcoxon", "paired_t"]:
        assert pw.loc[("a", "b", test), "reject"]
        assert pw.loc[("b", "c", test), "reject"]
        assert not pw.loc[("a", "c", test), "reject"]
        sub = cmp.pairwise[cmp.pairwise["test"] == test]
        np.testing.assert_allclose(
            sub["pvalue_holm"], _holm_by_hand(sub["pvalue"].to_numpy()), rtol=1e-12
        )
    # the planted difference and effect direction
    row = pw.loc[("a", "b", "paired_t")]
    assert row["mean_diff"] == pytest.approx(
        np.mean(df[df.arm == "a"]["value"].to_numpy() - df[df.arm == "b"]["value"].to_numpy())
    )
    assert row["effect_size"] < 0 and row["conf_int_high"] < 0
    assert "Omnibus" in cmp.summary() and "Holm" in cmp.summary()


def test_compare_arms_null_is_not_rejected():
    """Three exchangeable arms (same distribution): no omnibus or pairwise rejection."""
    rng = np.random.default_rng(11)
    base = rng.normal(50, 5, 15)
    df = long_frame({k: base + rng.normal(0, 1, 15) for k in ["a", "b", "c"]})
    cmp = compare_arms(df, "accuracy", "combined", "acute", n_resamples=199)
    om = cmp.omnibus.set_index("test")
    assert om.loc["friedman", "pvalue"] > 0.05
    assert om.loc["rm_anova", "pvalue"] > 0.05
    assert not cmp.pairwise["reject"].any()


def test_rm_anova_f_matches_hand_and_constant_data_is_flagged():
    """F = (SS_arm/(k-1)) / (SS_err/((k-1)(n-1))) from the two-way decomposition; arms with
    identical patient differences leave no residual and the ANOVA says so."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(8, 3)) + np.array([0.0, 0.5, 1.0])
    df = long_frame({f"arm{j}": x[:, j] for j in range(3)})
    om = compare_arms(df, "accuracy", "combined", "acute", n_resamples=99).omnibus
    g = x.mean()
    ss_arm = 8 * ((x.mean(0) - g) ** 2).sum()
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + g
    f = (ss_arm / 2) / ((resid**2).sum() / 14)
    assert om.set_index("test").loc["rm_anova", "statistic"] == pytest.approx(f, rel=1e-8)
    chi2 = sps.friedmanchisquare(*x.T).statistic
    assert om.set_index("test").loc["friedman", "statistic"] == pytest.approx(chi2)
    flat = long_frame({"a": np.full(5, 95.0), "b": np.full(5, 47.5), "c": np.full(5, 95.0)})
    res = compare_arms(flat, "accuracy", "combined", "acute", n_resamples=99)
    row = res.omnibus.set_index("test").loc["rm_anova"]
    assert math.isnan(row["pvalue"]) and "no residual" in row["note"]
    assert not res.rm_anova_valid


def test_paired_values_and_compare_arms_input_errors():
    """Default phase pairs untreated/pruned with acute arms; bad requests raise ValueError."""
    df = make_results(n_patients=3, seed=13)
    wide = paired_values(df, "accuracy", "combined")
    assert list(wide.columns) == ["untreated", "ketamine", "ssri", "neurosteroid"]
    raw = df[(df.arm == "untreated") & (df.phase == "pruned") & (df.condition == "combined")]
    np.testing.assert_allclose(wide["untreated"].to_numpy(), raw.sort_values("patient")["value"])
    with pytest.raises(ValueError, match="no rows"):
        compare_arms(df, "accuracy", "nonexistent")
    with pytest.raises(ValueError, match="two arms"):
        compare_arms(df, "relapse_drop", phase="acute_relapse", arms=["ssri"])
    with pytest.raises(TypeError):
        compare_arms(df.to_dict(), "accuracy")


def test_holm_matches_hand_and_statsmodels():
    """holm() equals the step-down formula by hand and statsmodels multipletests('holm')."""
    from statsmodels.stats.multitest import multipletests

    from analysis.stats import holm

    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.04])
    adj, reject = holm(p, alpha=0.05)
    np.testing.assert_allclose(adj, _holm_by_hand(p), rtol=1e-12)
    ref_reject, ref_adj, _, _ = multipletests(p, alpha=0.05, method="holm")
    np.testing.assert_allclose(adj, ref_adj, rtol=1e-12)
    assert reject.tolist() == ref_reject.tolist()
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])
