"""Descriptive statistics per arm: mean, SD, n and confidence intervals.

:func:`describe` summarises every (arm, phase, metric, condition, noise SD,
maintenance duration) cell of a results table across patients, with a
t-based and a bootstrap confidence interval of the mean.
:func:`relapse_probability` gives the share of relapses per arm (and
optionally per maintenance duration) with Wilson score intervals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from analysis._data import arm_order, check_results
from analysis._results import FrameResults, fmt_num, frame_to_text

__all__ = [
    "Description",
    "RelapseProbability",
    "RelapseRanking",
    "bootstrap_ci",
    "describe",
    "relapse_probability",
    "relapse_ranking",
    "t_ci",
]

KEYS = ["arm", "phase", "metric", "condition", "noise_sigma", "maintenance_epochs"]


def _check_confidence(confidence: float) -> float:
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool):
        raise TypeError(f"confidence must be a number, got {type(confidence).__name__}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


def t_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean (``ddof=1``); NaN for n < 2.

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.summaries import t_ci
    >>> [round(v, 3) for v in t_ci(np.array([1.0, 2.0, 3.0]))]
    [-0.484, 4.484]
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return float("nan"), float("nan")
    mean = float(x.mean())
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    if sem == 0.0:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2.0, x.size - 1)) * sem
    return mean - half, mean + half


def bootstrap_ci(
    values: np.ndarray,
    confidence: float = 0.95,
    *,
    n_resamples: int = 9999,
    method: str = "BCa",
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean (``scipy.stats.bootstrap``).

    Constant data give the degenerate interval (value, value); n < 2 gives
    NaN.  If BCa is undefined for the sample, the percentile interval is
    returned instead.

    Examples
    --------
    >>> import numpy as np
    >>> from analysis.summaries import bootstrap_ci
    >>> lo, hi = bootstrap_ci(np.arange(10.0), n_resamples=999)
    >>> lo < 4.5 < hi
    True
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0.0:
        return float(x[0]), float(x[0])
    for meth in dict.fromkeys([method, "percentile"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(
                (x,),
                np.mean,
                n_resamples=int(n_resamples),
                confidence_level=confidence,
                method=meth,
                rng=np.random.default_rng(seed),
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            return lo, hi
    return float("nan"), float("nan")


class Description(FrameResults):
    """Per-cell descriptive statistics across patients (from :func:`describe`).

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per cell: ``arm, phase, metric, condition, noise_sigma,
        maintenance_epochs, n, mean, sd`` (population SD, ``ddof=0``, as in the
        paper), ``sem`` (``ddof=1``), ``ci_t_low, ci_t_high, ci_boot_low,
        ci_boot_high``.
    confidence : float
        Confidence level of the intervals.
    """

    def summary(self) -> str:
        """Paper-style text: mean ± SD (n) with t and bootstrap intervals per cell."""
        pct = f"{100 * self.confidence:g}%"
        rows = []
        for _, r in self.frame.iterrows():
            cond = r["condition"]
            if not math.isnan(r["noise_sigma"]):
                cond = f"{cond} σ={r['noise_sigma']:g}"
            if not math.isnan(r["maintenance_epochs"]):
                cond = f"{cond} {r['maintenance_epochs']:g} ep".strip()
            d = _decimals(r["metric"])
            rows.append(
                {
                    "arm": r["arm"],
                    "phase": r["phase"],
                    "metric": r["metric"],
                    "condition": cond,
                    "n": str(int(r["n"])),
                    "mean ± SD": f"{fmt_num(r['mean'], d)} ± {fmt_num(r['sd'], d)}",
                    f"{pct} CI (t)": _interval(r["ci_t_low"], r["ci_t_high"], d),
                    f"{pct} CI (bootstrap)": _interval(r["ci_boot_low"], r["ci_boot_high"], d),
                }
            )
        title = f"Descriptive statistics across patients (SD with ddof=0; {pct} CIs of the mean)"
        return title + "\n" + frame_to_text(pd.DataFrame(rows))


def _decimals(metric: str) -> int:
    return {"gain": 2, "activation_magnitude": 3, "protection": 3, "relapsed": 2}.get(metric, 1)


def _interval(lo: float, hi: float, d: int) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return f"[{fmt_num(lo, d)}, {fmt_num(hi, d)}]"


def describe(
    results: pd.DataFrame,
    *,
    arms: Iterable[str] | None = None,
    phases: Iterable[str] | None = None,
    metrics: Iterable[str] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    bootstrap_method: str = "BCa",
    seed: int = 0,
) -> Description:
    """Mean, SD, n and confidence intervals of every cell across patients.

    A cell is one (arm, phase, metric, condition, noise SD, maintenance
    duration).  Each patient contributes one value per cell (the mean of its
    rows there); wash-out trajectories are summarised at their last step only.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table (``docs/results-schema.md``).
    arms, phases, metrics : iterable of str, optional
        Restrict to these arms / phases / metrics (default: all).
    confidence : float
        Confidence level of both intervals (default 0.95).
    n_resamples : int
        Bootstrap resamples (``scipy.stats.bootstrap``).
    bootstrap_method : {"BCa", "percentile", "basic"}
        Bootstrap interval method.
    seed : int
        Seed of the bootstrap generator (the same for every cell).

    Returns
    -------
    Description
        ``.frame`` / ``.summary_frame()`` hold the numbers, ``.summary()``
        prints them.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.summaries import describe
    >>> d = describe(make_results(n_patients=5), phases=["acute"], metrics=["gain"],
    ...              n_resamples=199)
    >>> d.summary_frame()[["arm", "n", "mean"]].to_string(index=False)
    '         arm  n  mean\\n    ketamine  5  1.25\\n        ssri  5  1.60\\nneurosteroid  5  0.85'
    """
    df = check_results(results)
    confidence = _check_confidence(confidence)
    if bootstrap_method not in ("BCa", "percentile", "basic"):
        raise ValueError(
            f"bootstrap_method must be 'BCa', 'percentile' or 'basic', got {bootstrap_method!r}"
        )
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    order = arm_order(df, arms)
    df = df[df["arm"].isin(order)]
    for name, wanted in (("phase", phases), ("metric", metrics)):
        if wanted is not None:
            if isinstance(wanted, str):
                raise TypeError(f"{name}s must be a sequence of names, not a single string")
            wanted = list(wanted)
            unknown = sorted(set(wanted) - set(df[name]))
            if unknown:
                raise ValueError(f"{name}(s) {unknown} not in results")
            df = df[df[name].isin(wanted)]
    if df["step"].notna().any():
        last = df.groupby(["arm", "phase"])["step"].transform("max")
        df = df[df["step"].isna() | (df["step"] == last)]
    keyed = df.assign(
        noise_sigma=df["noise_sigma"].fillna(-1.0),
        maintenance_epochs=df["maintenance_epochs"].fillna(-1.0),
    )
    per = keyed.groupby([*KEYS, "patient"], sort=False)["value"].mean().reset_index()
    records = []
    for key, grp in per.groupby(KEYS, sort=False):
        x = grp["value"].to_numpy(dtype=float)
        n = int(np.sum(~np.isnan(x)))
        t_lo, t_hi = t_ci(x, confidence)
        b_lo, b_hi = bootstrap_ci(
            x, confidence, n_resamples=n_resamples, method=bootstrap_method, seed=seed
        )
        xs = x[~np.isnan(x)]
        rec = dict(zip(KEYS, key, strict=True))
        rec.update(
            n=n,
            mean=float(xs.mean()) if n else float("nan"),
            sd=float(xs.std(ddof=0)) if n else float("nan"),
            sem=float(xs.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            ci_t_low=t_lo,
            ci_t_high=t_hi,
            ci_boot_low=b_lo,
            ci_boot_high=b_hi,
        )
        records.append(rec)
    frame = pd.DataFrame.from_records(
        records,
        columns=[
            *KEYS,
            "n",
            "mean",
            "sd",
            "sem",
            "ci_t_low",
            "ci_t_high",
            "ci_boot_low",
            "ci_boot_high",
        ],
    )
    for col in ("noise_sigma", "maintenance_epochs"):
        frame[col] = frame[col].astype(float).where(frame[col] != -1.0, np.nan)
    rank = {a: i for i, a in enumerate(order)}
    frame = (
        frame.assign(_r=frame["arm"].map(rank))
        .sort_values(["_r"], kind="stable")
        .drop(columns="_r")
        .reset_index(drop=True)
    )
    return Description(frame, confidence)


class RelapseProbability(FrameResults):
    """Relapse probabilities with Wilson intervals (from :func:`relapse_probability`).

    Attributes
    ----------
    frame : pandas.DataFrame
        Columns ``arm`` (and ``maintenance_epochs`` when by duration),
        ``n_patients``, ``n`` (patient x duration observations), ``relapsed``,
        ``probability`` (percent), ``conf_int_low``, ``conf_int_high``
        (percent, Wilson score), and, pooled over durations, ``patient_mean``
        and ``patient_sd`` (mean and ``ddof=0`` SD of the patients' own
        relapse percentages, the paper's Table 4 number).
    confidence : float
    """

    def __init__(self, frame: pd.DataFrame, confidence: float, by_duration: bool, by_label: bool = False) -> None:
        super().__init__(frame, confidence)
        self.by_duration = by_duration
        self.by_label = by_label

    def summary(self) -> str:
        """Paper-style text table of relapse probabilities and Wilson intervals."""
        pct = f"{100 * self.confidence:g}%"
        rows = []
        for _, r in self.frame.iterrows():
            row = {"arm": r["arm"]}
            if self.by_label:
                row["wash-out"] = r["label"]
            if self.by_duration:
                row["maintenance"] = f"{r['maintenance_epochs']:g}"
            row.update(
                {
                    "relapsed / n": f"{int(r['relapsed'])}/{int(r['n'])}",
                    "probability (%)": fmt_num(r["probability"], 1),
                    f"{pct} Wilson CI (%)": _interval(r["conf_int_low"], r["conf_int_high"], 1),
                }
            )
            if not self.by_duration:
                row["patients mean ± SD (%)"] = (
                    f"{fmt_num(r['patient_mean'], 1)} ± {fmt_num(r['patient_sd'], 1)}"
                )
            rows.append(row)
        title = "Manic relapse probability after wash-out"
        note = (
            "Wilson intervals treat every patient x duration as independent; durations of one "
            "patient are correlated, so see the GEE for clustered inference."
        )
        return f"{title}\n{frame_to_text(pd.DataFrame(rows))}\n{note}"


def relapse_probability(
    results: pd.DataFrame, *, by_duration: bool = False, by_label: bool = False, confidence: float = 0.95
) -> RelapseProbability:
    """Share of relapses per arm with Wilson score intervals.

    Counts the ``relapsed`` rows of the ``washout`` phase (one per patient x
    maintenance duration).  Intervals are
    ``statsmodels.stats.proportion.proportion_confint(method="wilson")``.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    by_duration : bool
        One row per arm and maintenance duration instead of per arm.
    by_label : bool
        One row per arm and wash-out ``label`` (e.g. a schedule that washes the same maintained
        networks out at several rates, ``studies/washout_counterfactual.toml``) instead of pooling
        every wash-out of an arm.
    confidence : float
        Confidence level (default 0.95).

    Returns
    -------
    RelapseProbability

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.summaries import relapse_probability
    >>> rp = relapse_probability(make_results(n_patients=4, seed=0))
    >>> r = rp.summary_frame().iloc[0]
    >>> (r["arm"], int(r["relapsed"]), int(r["n"]), float(r["probability"]))
    ('ketamine', 0, 24, 0.0)
    """
    from statsmodels.stats.proportion import proportion_confint

    df = check_results(results)
    confidence = _check_confidence(confidence)
    if not isinstance(by_duration, bool) or not isinstance(by_label, bool):
        raise TypeError("by_duration and by_label must be True or False")
    rel = _relapsed_rows(df)
    if by_label and "label" not in rel:
        raise ValueError("by_label: results have no 'label' column (written before schedules)")
    arms = [a for a in arm_order(df) if a in set(rel["arm"])]
    keys = ["arm", *(["label"] if by_label else []), *(["maintenance_epochs"] if by_duration else [])]
    records = []
    for key, grp in rel.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        n = len(grp)
        k = int(grp["value"].sum())
        lo, hi = proportion_confint(k, n, alpha=1.0 - confidence, method="wilson")
        per_patient = 100.0 * grp.groupby("patient")["value"].mean()
        rec = dict(zip(keys, key, strict=True))
        rec.update(
            n_patients=int(grp["patient"].nunique()),
            n=n,
            relapsed=k,
            probability=100.0 * k / n,
            conf_int_low=100.0 * float(lo),
            conf_int_high=100.0 * float(hi),
        )
        if not by_duration:
            rec.update(
                patient_mean=float(per_patient.mean()),
                patient_sd=float(per_patient.std(ddof=0)),
            )
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    rank = {a: i for i, a in enumerate(arms)}
    frame = (
        frame.assign(_r=frame["arm"].map(rank))
        .sort_values(["_r", *keys[1:]], kind="stable")
        .drop(columns="_r")
        .reset_index(drop=True)
    )
    return RelapseProbability(frame, confidence, by_duration, by_label)


def _relapsed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The wash-out ``relapsed`` verdicts (0 or 1), or ValueError."""
    rel = df[(df["phase"] == "washout") & (df["metric"] == "relapsed")]
    if rel.empty:
        raise ValueError("results have no wash-out 'relapsed' rows to count")
    bad = ~rel["value"].isin([0.0, 1.0])
    if bad.any():
        raise ValueError(f"'relapsed' must be 0 or 1; found {sorted(rel.loc[bad, 'value'])[:5]}")
    return rel


class RelapseRanking(FrameResults):
    """The arms' relapse ranking under each wash-out, with paired tests (from :func:`relapse_ranking`).

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per wash-out ``label`` and pair of arms adjacent in that wash-out's order:
        ``label``, ``lower`` and ``higher`` (arms, ``lower`` relapsing less), ``lower_probability``
        and ``higher_probability`` (percent of patient x duration), ``difference`` (mean over patients
        of the per-patient difference in relapse percent, higher minus lower), ``n_patients``,
        ``statistic`` and ``pvalue`` (two-sided Wilcoxon signed-rank on the per-patient percentages,
        :func:`analysis.stats.paired_test`; ``pvalue`` 1 when every patient ties).
        ``relation`` is ``"<"``, or ``"="`` where the two probabilities tie.
    orders : dict
        ``label -> tuple`` of groups of arms, least relapse first; arms whose probabilities tie
        share a group.
    """

    def __init__(self, frame: pd.DataFrame, orders: dict[str, tuple[tuple[str, ...], ...]]) -> None:
        super().__init__(frame, 0.95)
        self.orders = orders

    def same_order(self, reference: str) -> dict[str, bool]:
        """For each wash-out label, whether its ranking equals the ``reference`` label's."""
        if reference not in self.orders:
            raise ValueError(f"no wash-out labelled {reference!r}; labels: {', '.join(self.orders)}")
        return {label: order == self.orders[reference] for label, order in self.orders.items()}

    def order_text(self, label: str, name: Callable[[str], str] = str) -> str:
        """The ranking under wash-out ``label`` as text, e.g. ``"ketamine < neurosteroid = ssri"``
        (``name`` renders an arm)."""
        return " < ".join(" = ".join(name(a) for a in group) for group in self.orders[label])

    def summary(self) -> str:
        """Per wash-out: the arms from least to most relapse, and each adjacent pair's paired test."""
        from analysis._results import fmt_p

        rows = [{
            "wash-out": r["label"],
            "pair": f"{r['lower']} {r['relation']} {r['higher']}",
            "relapse (%)": f"{fmt_num(r['lower_probability'], 1)} vs {fmt_num(r['higher_probability'], 1)}",
            "per-patient diff": fmt_num(r["difference"], 1),
            "n": int(r["n_patients"]),
            "p (Wilcoxon)": fmt_p(r["pvalue"]),
        } for _, r in self.frame.iterrows()]
        orders = "\n".join(f"  {label}: {self.order_text(label)}" for label in self.orders)
        return f"Relapse ranking per wash-out (least relapse first)\n{orders}\n{frame_to_text(pd.DataFrame(rows))}"


def relapse_ranking(results: pd.DataFrame) -> RelapseRanking:
    """Rank the arms by relapse after each wash-out and test each adjacent pair on the same patients.

    The question of ``studies/washout_counterfactual.toml``: the paper's relapse ranking rests on
    decay rates set per arm a priori (fact 14); does it survive when every arm washes out equally
    fast? Each wash-out ``label`` ranks the arms by their relapse probability (Table 4's measure:
    the share of patient x maintenance duration that relapsed); each pair adjacent in that order is
    compared on the patients' own relapse percentages, paired by patient because every arm treats
    the same patients (two-sided Wilcoxon signed-rank, :func:`analysis.stats.paired_test`: zero
    differences dropped, p = 1 when every patient ties).

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table, with wash-out ``relapsed`` rows and a ``label`` column.

    Returns
    -------
    RelapseRanking

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [dict(patient=p, arm=a, phase="washout", metric="relapsed", condition="", noise_sigma=float("nan"),
    ...              maintenance_epochs=d, step=50.0, value=float(v), label=lab)
    ...         for lab, rates in {"fast": {"a": 1, "b": 0}, "slow": {"a": 0, "b": 0}}.items()
    ...         for a, v in rates.items() for p in range(4) for d in (25.0, 50.0)]
    >>> r = relapse_ranking(pd.DataFrame(rows))
    >>> r.orders["fast"], r.same_order("fast")
    ((('b',), ('a',)), {'fast': True, 'slow': False})
    """
    from analysis.stats import paired_test

    df = check_results(results)
    rel = _relapsed_rows(df)
    if "label" not in rel:
        raise ValueError("results have no 'label' column (written before schedules)")
    arms = [a for a in arm_order(df) if a in set(rel["arm"])]
    if len(arms) < 2:
        raise ValueError(f"a ranking needs at least two arms with wash-outs, got {arms}")
    orders: dict[str, tuple[tuple[str, ...], ...]] = {}
    records = []
    for label, grp in rel.groupby("label", sort=True):
        per = grp.pivot_table(index="patient", columns="arm", values="value", aggfunc="mean") * 100.0
        prob = grp.groupby("arm")["value"].mean() * 100.0
        order = sorted((a for a in arms if a in prob.index), key=lambda a: (prob[a], arms.index(a)))
        groups: list[list[str]] = []
        for a in order:
            if groups and math.isclose(prob[a], prob[groups[-1][0]], abs_tol=1e-9):
                groups[-1].append(a)
            else:
                groups.append([a])
        orders[str(label)] = tuple(tuple(g) for g in groups)
        for lower, higher in zip(order[:-1], order[1:]):
            both = per[[lower, higher]].dropna()
            diff = both[higher] - both[lower]
            stat, p, _ = paired_test(both[higher].to_numpy(), both[lower].to_numpy(), "wilcoxon", "two-sided")
            relation = "=" if math.isclose(prob[lower], prob[higher], abs_tol=1e-9) else "<"
            records.append(dict(label=str(label), lower=lower, relation=relation, higher=higher,
                                lower_probability=float(prob[lower]),
                                higher_probability=float(prob[higher]), difference=float(diff.mean()),
                                n_patients=len(both), statistic=stat, pvalue=p))
    return RelapseRanking(pd.DataFrame.from_records(records), orders)
