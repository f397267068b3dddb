"""Within-patient comparisons of treatment arms.

Every virtual patient receives every arm from the same pruned baseline, so
arms are compared as repeated measures: an omnibus test across arms
(Friedman; repeated-measures ANOVA with its normality and sphericity checks
and the Greenhouse-Geisser correction), pairwise paired tests (Wilcoxon
signed-rank and paired t) with Holm's correction, and paired effect sizes
with confidence intervals (Cohen's d_z with a noncentral-t interval for the
t test; the matched-pairs rank-biserial correlation with a bootstrap interval
for the Wilcoxon test).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from analysis._data import TableColumn, arm_order, cell_values, check_results, display_name
from analysis._results import ResultsBase, fmt_num, fmt_p, frame_to_text

__all__ = [
    "ArmComparison",
    "cohen_dz",
    "compare_arms",
    "holm",
    "mauchly",
    "paired_test",
    "paired_values",
    "rank_biserial",
]

TESTS = ("wilcoxon", "paired_t")
ALTERNATIVES = ("two-sided", "greater", "less")


def holm(pvalues: Iterable[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjusted p-values and rejections.

    The same numbers as ``statsmodels.stats.multitest.multipletests(p,
    method="holm")`` (checked in the tests); written out because that
    function runs a full garbage collection on every call, which dominates
    the report's run time.

    Examples
    --------
    >>> from analysis.stats import holm
    >>> adj, reject = holm([0.01, 0.04, 0.03])
    >>> adj.round(2).tolist(), reject.tolist()
    ([0.03, 0.06, 0.06], [True, False, False])
    """
    p = np.asarray(list(pvalues), dtype=float)
    if p.ndim != 1:
        raise ValueError("pvalues must be one-dimensional")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("pvalues must lie in [0, 1] (no NaN)")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    adj = np.empty(m)
    adj[order] = adj_sorted
    return adj, adj <= alpha


def paired_values(
    results: pd.DataFrame,
    metric: str,
    condition: str = "",
    phase: str | None = None,
    *,
    noise_sigma: float | None = None,
    arms: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One value per patient and arm, as a wide table (patients x arms).

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    metric : str
        Results metric, or ``relapse_probability`` (100 x share of relapsed
        durations per patient).
    condition : str
        Test condition of an accuracy (``""`` for other metrics).
    phase : str, optional
        Results phase; ``None`` uses each arm's assessment phase (``pruned``
        for untreated, ``acute`` for the treated arms), i.e. the paper's
        Tables 1-3.  For ``washout`` the last step is used, averaged over
        maintenance durations; ``maintenance`` is averaged over durations.
    noise_sigma : float, optional
        Internal-noise SD (for ``condition="internal_noise"``).
    arms : iterable of str, optional
        Arms to include (default: every arm with data, in paper order).

    Returns
    -------
    pandas.DataFrame
        Index ``patient``, one column per arm; only patients with a value in
        every arm (complete cases).

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.stats import paired_values
    >>> wide = paired_values(make_results(n_patients=3), "gain")
    >>> list(wide.columns), wide.shape
    (['untreated', 'ketamine', 'ssri', 'neurosteroid'], (3, 4))
    """
    df = check_results(results)
    if not isinstance(metric, str) or not isinstance(condition, str):
        raise TypeError("metric and condition must be strings")
    column = TableColumn(metric, metric, condition, noise_sigma, phase)
    wide = {}
    for arm in arm_order(df, arms):
        values = cell_values(df, column, arm)
        if not values.empty:
            wide[arm] = values
    if not wide:
        where = f"phase {phase!r}" if phase else "the assessment phases"
        raise ValueError(
            f"no rows for metric {metric!r}, condition {condition!r}"
            + (f", noise_sigma {noise_sigma}" if noise_sigma is not None else "")
            + f" in {where}"
        )
    frame = pd.DataFrame(wide).dropna(axis=0, how="any")
    frame.index.name = "patient"
    return frame


def paired_test(
    a: np.ndarray, b: np.ndarray, test: str = "wilcoxon", alternative: str = "two-sided"
) -> tuple[float, float, str]:
    """Paired test of ``a - b``: ``(statistic, pvalue, note)``.

    ``wilcoxon`` is ``scipy.stats.wilcoxon`` (zero differences dropped);
    ``paired_t`` is ``scipy.stats.ttest_rel``.  Degenerate data are decided
    without the library: all differences zero gives p = 1; a constant
    non-zero difference gives t = +/-inf and p = 0 (or 1 against the wrong
    direction) for the t test.

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.stats import paired_test
    >>> stat, p, note = paired_test(np.arange(8.0) + 1, np.zeros(8), "wilcoxon", "greater")
    >>> round(p, 4)
    0.0039
    """
    from scipy import stats

    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d of equal length, got {a.shape} and {b.shape}")
    d = a - b
    if d.size < 2:
        return float("nan"), float("nan"), "fewer than 2 pairs"
    if np.all(d == 0):
        return float("nan"), 1.0, "all differences zero"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if test == "paired_t":
            if np.ptp(d) == 0.0:
                sign = 1.0 if d[0] > 0 else -1.0
                wrong = (alternative == "greater" and sign < 0) or (
                    alternative == "less" and sign > 0
                )
                return sign * math.inf, 1.0 if wrong else 0.0, "constant non-zero difference"
            res = stats.ttest_rel(a, b, alternative=alternative)
            return float(res.statistic), float(res.pvalue), ""
        res = stats.wilcoxon(d, alternative=alternative)
        return float(res.statistic), float(res.pvalue), ""


def cohen_dz(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Cohen's d_z = mean(d) / SD(d, ddof=1) with its noncentral-t interval.

    The interval inverts the noncentral t distribution of
    ``t = d_z * sqrt(n)``: bounds ``lambda / sqrt(n)`` where
    ``nct.cdf(t, n - 1, lambda)`` equals ``1 - alpha/2`` and ``alpha/2``.

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.stats import cohen_dz
    >>> [round(v, 3) for v in cohen_dz(np.array([1.0, 2.0, 3.0, 4.0]))]
    [1.936, 0.146, 3.672]
    """
    from scipy import optimize, stats

    d = np.asarray(d, dtype=float)
    n = d.size
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        if mean == 0.0:
            return 0.0, 0.0, 0.0
        return math.copysign(math.inf, mean), float("nan"), float("nan")
    dz = mean / sd
    t = dz * math.sqrt(n)
    df = n - 1
    alpha = 1.0 - confidence

    def bound(target: float) -> float:
        def f(lam: float) -> float:
            return stats.nct.cdf(t, df, lam) - target

        lo, hi = t - 10.0, t + 10.0
        while f(lo) < 0:
            lo -= 10.0
        while f(hi) > 0:
            hi += 10.0
        return optimize.brentq(f, lo, hi, xtol=1e-10)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lam_low = bound(1.0 - alpha / 2.0)
        lam_high = bound(alpha / 2.0)
    return dz, lam_low / math.sqrt(n), lam_high / math.sqrt(n)


def rank_biserial(d: np.ndarray) -> np.ndarray | float:
    """Matched-pairs rank-biserial correlation of differences ``d`` (last axis).

    ``r = (T+ - T-) / (T+ + T-)`` where ``T+`` and ``T-`` are the sums of the
    ranks of ``|d|`` (zeros dropped, ties averaged) of the positive and the
    negative differences; 0 when every difference is zero.  Vectorised over
    leading axes (for the bootstrap).

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.stats import rank_biserial
    >>> float(rank_biserial(np.array([1.0, 2.0, -3.0, 0.0])))
    0.0
    """
    from scipy import stats

    d = np.asarray(d, dtype=float)
    absd = np.abs(d)
    zeros = (d == 0).sum(axis=-1, keepdims=True)
    ranks = stats.rankdata(absd, axis=-1) - zeros
    t_plus = np.where(d > 0, ranks, 0.0).sum(axis=-1)
    t_minus = np.where(d < 0, ranks, 0.0).sum(axis=-1)
    total = t_plus + t_minus
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(total > 0, (t_plus - t_minus) / np.where(total > 0, total, 1.0), 0.0)
    return float(r) if np.ndim(r) == 0 else r


def _rank_biserial_ci(
    d: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> tuple[float, float]:
    from scipy import stats

    if d.size < 2 or np.ptp(d) == 0.0:
        r = rank_biserial(d)
        return (r, r) if d.size >= 2 else (float("nan"), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (d,),
            lambda x, axis: rank_biserial(np.moveaxis(x, axis, -1)),
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mauchly(wide: np.ndarray) -> tuple[float, float, float, float]:
    """Mauchly's sphericity test and the Greenhouse-Geisser epsilon.

    ``wide`` is subjects x conditions.  With orthonormal contrasts ``C`` and
    the sample covariance ``S``, ``M = C' S C`` (order ``p = k - 1``),
    ``W = det(M) / (tr(M) / p) ** p``, chi-square ``-(n - 1 - (2p^2 + p + 2) /
    (6p)) ln W`` on ``p (p + 1) / 2 - 1`` df, and the Greenhouse-Geisser
    ``epsilon = tr(M)^2 / (p tr(M^2))``.

    Returns
    -------
    (W, chi2, pvalue, epsilon)
        With two conditions sphericity holds trivially: ``(1, 0, 1, 1)``.
        NaN where undefined (fewer subjects than conditions, or no variance).

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.stats import mauchly
    >>> mauchly(np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 3.0]]))
    (1.0, 0.0, 1.0, 1.0)
    """
    from scipy import linalg, stats

    x = np.asarray(wide, dtype=float)
    n, k = x.shape
    if k < 3:
        return 1.0, 0.0, 1.0, 1.0
    p = k - 1
    helmert = linalg.helmert(k, full=False).T  # k x p, orthonormal columns
    s = np.cov(x, rowvar=False, ddof=1)
    m = helmert.T @ s @ helmert
    tr = float(np.trace(m))
    if tr <= 0.0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    eps = tr**2 / (p * float(np.trace(m @ m)))
    if n <= p:
        return float("nan"), float("nan"), float("nan"), min(1.0, eps)
    w = float(np.linalg.det(m)) / (tr / p) ** p
    if w <= 0.0:
        return max(w, 0.0), float("inf"), 0.0, min(1.0, eps)
    dof = p * (p + 1) / 2 - 1
    chi2 = -(n - 1 - (2 * p**2 + p + 2) / (6 * p)) * math.log(w)
    return w, chi2, float(stats.chi2.sf(chi2, dof)), min(1.0, eps)


class ArmComparison(ResultsBase):
    """Within-patient comparison of arms on one measure (from :func:`compare_arms`).

    Attributes
    ----------
    data : pandas.DataFrame
        Patients x arms values compared (complete cases).
    omnibus : pandas.DataFrame
        Rows ``friedman``, ``rm_anova`` and ``rm_anova_gg`` with columns
        ``test, statistic, df_num, df_den, pvalue, effect_size_name,
        effect_size, note`` (Kendall's W for Friedman, partial eta-squared for
        the ANOVA).
    assumptions : pandas.DataFrame
        Checks of the RM-ANOVA: ``shapiro_residuals`` (normality of the
        residuals of the additive patient + arm model) and ``mauchly``
        (sphericity), with columns ``check, statistic, pvalue, met, note``.
    pairwise : pandas.DataFrame
        One row per pair of arms and test: ``arm_a, arm_b, test, n, mean_a,
        mean_b, mean_diff`` (a - b), ``statistic, pvalue, pvalue_holm``
        (Holm within each test), ``reject`` (at ``alpha`` after Holm),
        ``effect_size_name, effect_size, conf_int_low, conf_int_high`` (CI of
        the effect size), ``note``.
    label : str
        What was compared.
    alpha, confidence : float
    """

    def __init__(
        self,
        label: str,
        data: pd.DataFrame,
        omnibus: pd.DataFrame,
        assumptions: pd.DataFrame,
        pairwise: pd.DataFrame,
        *,
        alpha: float,
        confidence: float,
        dropped: int,
    ) -> None:
        self.label = label
        self.data = data
        self.omnibus = omnibus
        self.assumptions = assumptions
        self.pairwise = pairwise
        self.alpha = alpha
        self.confidence = confidence
        self.dropped = dropped

    @property
    def arms(self) -> list[str]:
        """Arms compared, in paper order."""
        return list(self.data.columns)

    @property
    def n(self) -> int:
        """Number of patients with a value in every arm."""
        return len(self.data)

    @property
    def rm_anova_valid(self) -> bool:
        """True when every checked RM-ANOVA assumption is met."""
        met = self.assumptions["met"]
        return bool(len(met) and met.fillna(False).astype(bool).all())

    def summary_frame(self) -> pd.DataFrame:
        """The pairwise comparisons as a DataFrame (a copy)."""
        return self.pairwise.copy()

    def summary(self) -> str:
        """Paper-style text: arm means, omnibus tests, assumption checks, pairwise tests."""
        lines = [f"Within-patient comparison of arms: {self.label} (n = {self.n} patients)"]
        if self.dropped:
            lines.append(f"({self.dropped} patient(s) without a value in every arm left out)")
        means = pd.DataFrame(
            {
                "arm": [display_name(a) for a in self.arms],
                "mean": self.data.mean().to_numpy(),
                "SD (ddof=0)": self.data.std(ddof=0).to_numpy(),
            }
        )
        lines += ["", frame_to_text(means, 3), "", "Omnibus tests across arms"]
        om = self.omnibus.drop(columns=["note"])
        lines.append(frame_to_text(om, 3))
        for _, r in self.omnibus.iterrows():
            if r["note"]:
                lines.append(f"  {r['test']}: {r['note']}")
        lines += ["", "Repeated-measures ANOVA assumptions"]
        lines.append(frame_to_text(self.assumptions.drop(columns=["note"]), 3))
        for _, r in self.assumptions.iterrows():
            if r["note"]:
                lines.append(f"  {r['check']}: {r['note']}")
        verdict = (
            "assumptions met: the uncorrected RM-ANOVA applies"
            if self.rm_anova_valid
            else "assumptions not met or not checkable: rely on Friedman "
            "(or the Greenhouse-Geisser row)"
        )
        lines.append(f"  -> {verdict}")
        pct = f"{100 * self.confidence:g}%"
        lines += [
            "",
            f"Pairwise paired tests (Holm-adjusted within each test; alpha={self.alpha})",
        ]
        rows = []
        for _, r in self.pairwise.iterrows():
            rows.append(
                {
                    "pair": f"{r['arm_a']} - {r['arm_b']}",
                    "test": r["test"],
                    "mean diff": fmt_num(r["mean_diff"], 3),
                    "statistic": fmt_num(r["statistic"], 3),
                    "p": fmt_p(r["pvalue"]),
                    "p (Holm)": fmt_p(r["pvalue_holm"]),
                    "effect": f"{r['effect_size_name']} = {fmt_num(r['effect_size'], 2)}",
                    f"{pct} CI": f"[{fmt_num(r['conf_int_low'], 2)}, "
                    f"{fmt_num(r['conf_int_high'], 2)}]",
                }
            )
        lines.append(frame_to_text(pd.DataFrame(rows)))
        return "\n".join(lines)


def _omnibus(x: np.ndarray, arms: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from scipy import stats

    n, k = x.shape
    nan = float("nan")
    rows = []
    # Friedman
    if k < 3:
        rows.append(("friedman", nan, nan, nan, nan, "kendall_w", nan, "needs 3 or more arms"))
    elif n < 2:
        rows.append(("friedman", nan, nan, nan, nan, "kendall_w", nan, "needs 2 or more patients"))
    else:
        ranks = stats.rankdata(x, axis=1)
        if np.all(ranks == ranks[:, :1]):
            rows.append(("friedman", nan, k - 1, nan, 1.0, "kendall_w", 0.0, "every patient tied"))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.friedmanchisquare(*x.T)
            chi2 = float(res.statistic)
            rows.append(
                (
                    "friedman",
                    chi2,
                    k - 1,
                    nan,
                    float(res.pvalue),
                    "kendall_w",
                    chi2 / (n * (k - 1)),
                    "",
                )
            )
    # repeated-measures ANOVA (additive patient + arm model)
    checks = []
    grand = x.mean()
    resid = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + grand
    ss_arm = n * float(((x.mean(axis=0) - grand) ** 2).sum())
    ss_err = float((resid**2).sum())
    df1, df2 = k - 1, (k - 1) * (n - 1)
    scale = max(1.0, float(np.abs(x).max()))
    if n < 2:
        note = "needs 2 or more patients"
        rows.append(("rm_anova", nan, df1, df2, nan, "partial_eta_sq", nan, note))
        rows.append(("rm_anova_gg", nan, nan, nan, nan, "partial_eta_sq", nan, note))
    elif ss_err <= 1e-20 * scale**2 * x.size:
        note = "no residual variation (arm differences identical in every patient): F undefined"
        rows.append(("rm_anova", nan, df1, df2, nan, "partial_eta_sq", nan, note))
        rows.append(("rm_anova_gg", nan, nan, nan, nan, "partial_eta_sq", nan, note))
    else:
        from statsmodels.stats.anova import AnovaRM

        long = pd.DataFrame(
            {
                "patient": np.repeat(np.arange(n), k),
                "arm": np.tile(np.array(arms, dtype=object), n),
                "value": x.reshape(-1),
            }
        )
        table = AnovaRM(long, depvar="value", subject="patient", within=["arm"]).fit().anova_table
        f = float(table["F Value"].iloc[0])
        p = float(table["Pr > F"].iloc[0])
        eta = ss_arm / (ss_arm + ss_err)
        rows.append(("rm_anova", f, df1, df2, p, "partial_eta_sq", eta, ""))
        _, _, _, eps = mauchly(x)
        if math.isnan(eps):
            rows.append(
                ("rm_anova_gg", nan, nan, nan, nan, "partial_eta_sq", eta, "epsilon undefined")
            )
        else:
            p_gg = float(stats.f.sf(f, df1 * eps, df2 * eps))
            rows.append(
                (
                    "rm_anova_gg",
                    f,
                    df1 * eps,
                    df2 * eps,
                    p_gg,
                    "partial_eta_sq",
                    eta,
                    f"Greenhouse-Geisser epsilon = {eps:.3f}",
                )
            )
    # assumption checks
    r = resid.reshape(-1)
    if r.size >= 3 and np.ptp(r) > 1e-12 * scale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sw = stats.shapiro(r)
        checks.append(
            (
                "shapiro_residuals",
                float(sw.statistic),
                float(sw.pvalue),
                bool(sw.pvalue > 0.05),
                "normality of additive-model residuals",
            )
        )
    else:
        checks.append(("shapiro_residuals", nan, nan, None, "not checkable (no residual spread)"))
    w, chi2, p, eps = mauchly(x)
    if k < 3:
        checks.append(("mauchly", 1.0, 1.0, True, "two arms: sphericity holds trivially"))
    elif math.isnan(p):
        checks.append(
            ("mauchly", w, p, None, "not checkable (patients <= arms - 1 or no variance)")
        )
    else:
        checks.append(("mauchly", w, p, bool(p > 0.05), f"chi2 = {chi2:.3f}"))
    omnibus = pd.DataFrame(
        rows,
        columns=[
            "test",
            "statistic",
            "df_num",
            "df_den",
            "pvalue",
            "effect_size_name",
            "effect_size",
            "note",
        ],
    )
    assumptions = pd.DataFrame(checks, columns=["check", "statistic", "pvalue", "met", "note"])
    assumptions["met"] = assumptions["met"].astype(object)
    return omnibus, assumptions


def compare_arms(
    results: pd.DataFrame,
    metric: str = "accuracy",
    condition: str = "",
    phase: str | None = None,
    *,
    noise_sigma: float | None = None,
    arms: Iterable[str] | None = None,
    alpha: float = 0.05,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> ArmComparison:
    """Compare arms within patients on one measure.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    metric, condition, phase, noise_sigma, arms
        Which measure and arms; see :func:`paired_values` (``phase=None``
        compares the untreated pruned state with each arm's acute state).
    alpha : float
        Family-wise error rate for Holm's correction.
    confidence : float
        Confidence level of the effect-size intervals.
    n_resamples : int
        Bootstrap resamples for the rank-biserial intervals.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    ArmComparison
        With ``.omnibus``, ``.assumptions``, ``.pairwise`` DataFrames and
        ``.summary()``.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.stats import compare_arms
    >>> cmp = compare_arms(make_results(n_patients=8), "accuracy", "combined", "acute",
    ...                    n_resamples=199)
    >>> cmp.arms
    ['ketamine', 'ssri', 'neurosteroid']
    >>> bool(cmp.omnibus.set_index("test").loc["friedman", "pvalue"] < 0.05)
    True
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    df = check_results(results)
    wide_all = pd.DataFrame(
        paired_values(df, metric, condition, phase, noise_sigma=noise_sigma, arms=arms)
    )
    complete = wide_all
    n_patients = int(df["patient"].nunique())
    dropped = n_patients - len(complete)
    arm_list = list(complete.columns)
    if len(arm_list) < 2:
        raise ValueError(f"need at least two arms with data to compare, got {arm_list}")
    if len(complete) < 2:
        raise ValueError("need at least two patients with a value in every arm")
    x = complete.to_numpy(dtype=float)
    omnibus, assumptions = _omnibus(x, arm_list)
    records = []
    for (i, a), (j, b) in itertools.combinations(enumerate(arm_list), 2):
        d = x[:, i] - x[:, j]
        for test in TESTS:
            stat, p, note = paired_test(x[:, i], x[:, j], test)
            if test == "paired_t":
                name = "cohen_dz"
                es, lo, hi = cohen_dz(d, confidence)
            else:
                name = "rank_biserial"
                es = rank_biserial(d)
                lo, hi = _rank_biserial_ci(d, confidence, n_resamples, seed)
            records.append(
                {
                    "arm_a": a,
                    "arm_b": b,
                    "test": test,
                    "n": len(d),
                    "mean_a": float(x[:, i].mean()),
                    "mean_b": float(x[:, j].mean()),
                    "mean_diff": float(d.mean()),
                    "statistic": stat,
                    "pvalue": p,
                    "effect_size_name": name,
                    "effect_size": float(es),
                    "conf_int_low": float(lo),
                    "conf_int_high": float(hi),
                    "note": note,
                }
            )
    pairwise = pd.DataFrame.from_records(records)
    pairwise["pvalue_holm"] = np.nan
    pairwise["reject"] = False
    for test in TESTS:
        idx = pairwise.index[(pairwise["test"] == test) & pairwise["pvalue"].notna()]
        if len(idx):
            p_holm, reject = holm(pairwise.loc[idx, "pvalue"].to_numpy(), alpha)
            pairwise.loc[idx, "pvalue_holm"] = p_holm
            pairwise.loc[idx, "reject"] = reject
    cols = [
        "arm_a",
        "arm_b",
        "test",
        "n",
        "mean_a",
        "mean_b",
        "mean_diff",
        "statistic",
        "pvalue",
        "pvalue_holm",
        "reject",
        "effect_size_name",
        "effect_size",
        "conf_int_low",
        "conf_int_high",
        "note",
    ]
    pairwise = pairwise[cols]
    label = metric + (f" [{condition}]" if condition else "")
    if noise_sigma is not None:
        label += f" σ={noise_sigma:g}"
    label += f", phase {phase}" if phase else ", untreated pruned vs acute"
    return ArmComparison(
        label,
        complete,
        omnibus,
        assumptions,
        pairwise,
        alpha=alpha,
        confidence=confidence,
        dropped=dropped,
    )
