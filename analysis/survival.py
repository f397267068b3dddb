"""Time to relapse during wash-out: Kaplan-Meier, log-rank and Cox regression.

:func:`time_to_relapse` reads each wash-out trajectory of biased-noise
accuracy (one per patient x arm x maintenance duration) and returns the first
step at which the accuracy falls below the relapse threshold (an event), or
the last step (censored) if it never does.  :func:`kaplan_meier`,
:func:`logrank` and :func:`cox` analyse that table with ``statsmodels``
(``SurvfuncRight``, ``survdiff``, ``PHReg``).

The trajectories of one patient (its maintenance durations) are not
independent: the Cox model uses robust standard errors clustered by
patient; Kaplan-Meier intervals and the log-rank test treat trajectories as
independent (say so when reporting them), and the log-rank test can be
stratified by maintenance duration.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from analysis._data import arm_order, check_results, relapse_threshold, require_columns
from analysis._results import ResultsBase, fmt_num, fmt_p, frame_to_text

__all__ = [
    "CoxModel",
    "KaplanMeier",
    "LogRank",
    "cox",
    "kaplan_meier",
    "logrank",
    "time_to_relapse",
]

TTR_COLUMNS = ("patient", "arm", "maintenance_epochs", "time", "event")


def time_to_relapse(
    results: pd.DataFrame,
    protocol: Mapping | None = None,
    *,
    threshold: float | None = None,
) -> pd.DataFrame:
    """First wash-out step with biased-noise accuracy below the relapse threshold.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table with ``washout`` biased ``accuracy`` rows per
        step.
    protocol : dict, optional
        Resolved protocol; ``longitudinal.relapse_threshold`` (percent) is
        used when ``threshold`` is not given (default 60).
    threshold : float, optional
        Relapse threshold in percent; overrides the protocol.

    Returns
    -------
    pandas.DataFrame
        One row per trajectory: ``patient, arm, maintenance_epochs, time``
        (the first step with accuracy < threshold, else the last step),
        ``event`` (1 = fell below, 0 = censored at the last step),
        ``last_step`` and ``accuracy`` (at ``time``).  Step 0 (just
        discontinued) counts: an accuracy already below the threshold there
        is an event at time 0.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.survival import time_to_relapse
    >>> ttr = time_to_relapse(make_results(n_patients=2, seed=0))
    >>> int(ttr.loc[ttr["arm"] == "ketamine", "event"].sum())
    0
    """
    df = check_results(results)
    if threshold is None:
        thr = relapse_threshold(protocol)
    else:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        thr = float(threshold)
    rows = df[
        (df["phase"] == "washout") & (df["metric"] == "accuracy") & (df["condition"] == "biased")
    ]
    rows = rows[rows["step"].notna()]
    if rows.empty:
        raise ValueError("results have no per-step wash-out biased-noise accuracy rows")
    rows = rows.sort_values(["arm", "patient", "maintenance_epochs", "step"], kind="stable")
    records = []
    order = {a: i for i, a in enumerate(arm_order(df))}
    for (arm, patient, epochs), grp in rows.groupby(
        ["arm", "patient", "maintenance_epochs"], sort=False, dropna=False
    ):
        steps = grp["step"].to_numpy(dtype=float)
        acc = grp["value"].to_numpy(dtype=float)
        below = np.flatnonzero(acc < thr)
        if below.size:
            i, event = int(below[0]), 1
        else:
            i, event = len(steps) - 1, 0
        records.append(
            {
                "patient": int(patient),
                "arm": arm,
                "maintenance_epochs": float(epochs),
                "time": float(steps[i]),
                "event": event,
                "last_step": float(steps[-1]),
                "accuracy": float(acc[i]),
            }
        )
    out = pd.DataFrame.from_records(records)
    out["_r"] = out["arm"].map(order)
    out = out.sort_values(["_r", "patient", "maintenance_epochs"], kind="stable")
    return out.drop(columns="_r").reset_index(drop=True)


def _check_ttr(ttr: object) -> pd.DataFrame:
    require_columns(ttr, TTR_COLUMNS, "the time-to-relapse table", expected="the DataFrame from time_to_relapse()")
    bad = ~ttr["event"].isin([0, 1])
    if bad.any():
        raise ValueError("event must be 0 (censored) or 1 (relapse)")
    return ttr


def _arms(ttr: pd.DataFrame, arms: Iterable[str] | None) -> list[str]:
    present = list(dict.fromkeys(ttr["arm"]))
    if arms is None:
        return present
    if isinstance(arms, str):
        raise TypeError("arms must be a sequence of arm names, not a single string")
    arms = list(arms)
    unknown = [a for a in arms if a not in present]
    if unknown:
        raise ValueError(f"arm(s) {unknown} not in the time-to-relapse table; present: {present}")
    return arms


class KaplanMeier(ResultsBase):
    """Kaplan-Meier estimates per arm (from :func:`kaplan_meier`).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per arm and distinct observed time: ``arm, time, n_at_risk,
        n_events, n_censored, survival, std_err`` (Greenwood) and
        ``conf_int_low, conf_int_high`` (log-log transformed, pointwise).
    medians : pandas.DataFrame
        ``arm, n, events, censored, median`` (first time with survival <= 0.5;
        NaN if not reached) and ``survival_end`` (at the last time).
    confidence : float
    """

    def __init__(self, table: pd.DataFrame, medians: pd.DataFrame, confidence: float) -> None:
        self.table = table
        self.medians = medians
        self.confidence = confidence

    def survival_at(self, arm: str, time: float) -> float:
        """Estimated probability of no relapse up to and including ``time``."""
        part = self.table[(self.table["arm"] == arm) & (self.table["time"] <= time)]
        if arm not in set(self.table["arm"]):
            raise ValueError(f"arm {arm!r} not in the estimates")
        return 1.0 if part.empty else float(part["survival"].iloc[-1])

    def summary_frame(self) -> pd.DataFrame:
        """The survival table as a DataFrame (a copy)."""
        return self.table.copy()

    def summary(self) -> str:
        """Per-arm events, median time to relapse and survival at the end of wash-out."""
        rows = []
        for _, r in self.medians.iterrows():
            rows.append(
                {
                    "arm": r["arm"],
                    "trajectories": str(int(r["n"])),
                    "relapses": str(int(r["events"])),
                    "censored": str(int(r["censored"])),
                    "median step": "not reached"
                    if math.isnan(r["median"])
                    else f"{r['median']:g}",
                    "S(end)": fmt_num(r["survival_end"], 3),
                }
            )
        return (
            "Time to relapse during wash-out (Kaplan-Meier; step of first biased accuracy "
            "below threshold)\n" + frame_to_text(pd.DataFrame(rows))
        )


def kaplan_meier(
    ttr: pd.DataFrame, *, arms: Iterable[str] | None = None, confidence: float = 0.95
) -> KaplanMeier:
    """Kaplan-Meier curves of time to relapse, per arm.

    Survival and Greenwood standard errors come from
    ``statsmodels.duration.survfunc.SurvfuncRight``; the pointwise interval
    is ``S ** exp(+/- z * se / (S * log S))`` (log-log).

    Parameters
    ----------
    ttr : pandas.DataFrame
        From :func:`time_to_relapse`.
    arms : iterable of str, optional
        Arms to estimate (default: all, in table order).
    confidence : float
        Level of the pointwise intervals.

    Returns
    -------
    KaplanMeier

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.survival import kaplan_meier
    >>> ttr = pd.DataFrame({"patient": [0, 1, 2, 3], "arm": "a",
    ...                     "maintenance_epochs": 25.0,
    ...                     "time": [1.0, 2.0, 2.0, 3.0], "event": [1, 1, 0, 1]})
    >>> km = kaplan_meier(ttr)
    >>> km.table["survival"].round(4).tolist()
    [0.75, 0.5, 0.0]
    """
    from scipy import stats
    from statsmodels.duration.survfunc import SurvfuncRight

    ttr = _check_ttr(ttr)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    tables, medians = [], []
    for arm in _arms(ttr, arms):
        sub = ttr[ttr["arm"] == arm]
        time = sub["time"].to_numpy(dtype=float)
        event = sub["event"].to_numpy(dtype=int)
        if event.sum() > 0:
            sf = SurvfuncRight(time, event)
            ev_t = np.asarray(sf.surv_times, dtype=float)
            ev_s = np.asarray(sf.surv_prob, dtype=float)
            ev_se = np.asarray(sf.surv_prob_se, dtype=float)
        else:
            ev_t = ev_s = ev_se = np.array([], dtype=float)
        times = np.unique(time)
        rows = []
        for t in times:
            k = np.searchsorted(ev_t, t, side="right") - 1
            s = 1.0 if k < 0 else float(ev_s[k])
            se = 0.0 if k < 0 else float(ev_se[k])
            if s <= 0.0 or s >= 1.0 or se == 0.0:
                lo = hi = s
            else:
                w = z * se / (s * abs(math.log(s)))
                lo, hi = s ** math.exp(w), s ** math.exp(-w)
            rows.append(
                {
                    "arm": arm,
                    "time": float(t),
                    "n_at_risk": int((time >= t).sum()),
                    "n_events": int(((time == t) & (event == 1)).sum()),
                    "n_censored": int(((time == t) & (event == 0)).sum()),
                    "survival": s,
                    "std_err": se,
                    "conf_int_low": lo,
                    "conf_int_high": hi,
                }
            )
        tab = pd.DataFrame.from_records(rows)
        tables.append(tab)
        reached = tab.loc[tab["survival"] <= 0.5, "time"]
        medians.append(
            {
                "arm": arm,
                "n": len(sub),
                "events": int(event.sum()),
                "censored": int(len(sub) - event.sum()),
                "median": float(reached.iloc[0]) if len(reached) else float("nan"),
                "survival_end": float(tab["survival"].iloc[-1]),
            }
        )
    return KaplanMeier(
        pd.concat(tables, ignore_index=True), pd.DataFrame.from_records(medians), confidence
    )


class LogRank(ResultsBase):
    """Log-rank tests of equal time-to-relapse distributions (from :func:`logrank`).

    Attributes
    ----------
    overall : pandas.DataFrame
        One row: ``arms, statistic`` (chi-square), ``df, pvalue, note``.
    pairwise : pandas.DataFrame
        ``arm_a, arm_b, statistic, pvalue, pvalue_holm, note``.
    strata : str or None
    """

    def __init__(self, overall: pd.DataFrame, pairwise: pd.DataFrame, strata: str | None) -> None:
        self.overall = overall
        self.pairwise = pairwise
        self.strata = strata

    def summary_frame(self) -> pd.DataFrame:
        """The overall and pairwise tests stacked (``comparison`` names the arms)."""
        o = self.overall.assign(comparison=self.overall["arms"]).drop(columns="arms")
        p = self.pairwise.assign(
            comparison=self.pairwise["arm_a"] + " vs " + self.pairwise["arm_b"]
        )
        p = p.drop(columns=["arm_a", "arm_b"])
        cols = ["comparison", "statistic", "pvalue", "pvalue_holm", "note"]
        return pd.concat([o, p], ignore_index=True).reindex(columns=cols)

    def summary(self) -> str:
        """Text of the overall and Holm-adjusted pairwise log-rank tests."""
        strat = f", stratified by {self.strata}" if self.strata else ""
        o = self.overall.iloc[0]
        lines = [
            f"Log-rank test of time to relapse across arms{strat}",
            f"  all arms: chi2 = {fmt_num(o['statistic'], 3)}, df = {fmt_num(o['df'], 0)}, "
            f"p = {fmt_p(o['pvalue'])}" + (f"  ({o['note']})" if o["note"] else ""),
            "Pairwise (Holm-adjusted):",
        ]
        rows = [
            {
                "pair": f"{r['arm_a']} vs {r['arm_b']}",
                "chi2": fmt_num(r["statistic"], 3),
                "p": fmt_p(r["pvalue"]),
                "p (Holm)": fmt_p(r["pvalue_holm"]),
                "note": r["note"],
            }
            for _, r in self.pairwise.iterrows()
        ]
        if rows:
            lines.append(frame_to_text(pd.DataFrame(rows)))
        lines.append("Trajectories are treated as independent (durations of a patient are not).")
        return "\n".join(lines)


def _survdiff(sub: pd.DataFrame, strata: str | None) -> tuple[float, float, str]:
    from statsmodels.duration.survfunc import survdiff

    if sub["event"].sum() == 0:
        return float("nan"), float("nan"), "no relapse in any compared arm: test undefined"
    kwargs = {}
    if strata is not None:
        kwargs["strata"] = sub[strata].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            chi2, p = survdiff(
                sub["time"].to_numpy(dtype=float),
                sub["event"].to_numpy(dtype=int),
                sub["arm"].to_numpy(dtype=object),
                **kwargs,
            )
        except (ValueError, np.linalg.LinAlgError) as exc:
            return float("nan"), float("nan"), f"not computable: {exc}"
    if not np.isfinite(chi2):
        return float("nan"), float("nan"), "not computable (degenerate variance)"
    return float(chi2), float(p), ""


def logrank(
    ttr: pd.DataFrame, *, arms: Iterable[str] | None = None, strata: str | None = None
) -> LogRank:
    """Log-rank test across arms, and pairwise with Holm's correction.

    Uses ``statsmodels.duration.survfunc.survdiff``.

    Parameters
    ----------
    ttr : pandas.DataFrame
        From :func:`time_to_relapse`.
    arms : iterable of str, optional
        Arms to compare (default all).
    strata : str, optional
        A column of ``ttr`` to stratify by, e.g. ``"maintenance_epochs"``.

    Returns
    -------
    LogRank

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.survival import logrank, time_to_relapse
    >>> lr = logrank(time_to_relapse(make_results(n_patients=4, seed=0)))
    >>> bool(lr.overall["pvalue"].iloc[0] < 0.05)
    True
    """
    from analysis.stats import holm

    ttr = _check_ttr(ttr)
    arms = _arms(ttr, arms)
    if len(arms) < 2:
        raise ValueError("log-rank needs at least two arms")
    if strata is not None and strata not in ttr.columns:
        raise ValueError(f"strata column {strata!r} not in the table")
    sub = ttr[ttr["arm"].isin(arms)]
    chi2, p, note = _survdiff(sub, strata)
    overall = pd.DataFrame(
        [
            {
                "arms": ", ".join(arms),
                "statistic": chi2,
                "df": len(arms) - 1,
                "pvalue": p,
                "note": note,
            }
        ]
    )
    rows = []
    for a, b in itertools.combinations(arms, 2):
        chi2, p, note = _survdiff(ttr[ttr["arm"].isin([a, b])], strata)
        rows.append({"arm_a": a, "arm_b": b, "statistic": chi2, "pvalue": p, "note": note})
    pairwise = pd.DataFrame.from_records(rows)
    pairwise["pvalue_holm"] = np.nan
    ok = pairwise["pvalue"].notna()
    if ok.any():
        pairwise.loc[ok, "pvalue_holm"] = holm(pairwise.loc[ok, "pvalue"].to_numpy())[0]
    pairwise = pairwise[["arm_a", "arm_b", "statistic", "pvalue", "pvalue_holm", "note"]]
    return LogRank(overall, pairwise, strata)


class CoxModel(ResultsBase):
    """Cox proportional-hazards model of time to relapse (from :func:`cox`).

    Attributes
    ----------
    fitted : bool
    message : str
        Why the model was not fitted.
    notes : list of str
        Arms left out (no relapse: hazard ratio 0, log-hazard -inf) and other
        caveats.
    params : pandas.DataFrame
        ``term, coef, std_err, z, pvalue, conf_int_low, conf_int_high``
        (log-hazard) and ``hazard_ratio, hr_conf_int_low, hr_conf_int_high``.
    reference : str or None
    n_obs, n_events, n_groups : int
    model_result : object or None
    """

    def __init__(
        self,
        *,
        fitted: bool,
        message: str = "",
        notes=None,
        params=None,
        reference=None,
        n_obs=0,
        n_events=0,
        n_groups=0,
        model_result=None,
        formula: str = "",
    ) -> None:
        self.fitted = fitted
        self.message = message
        self.notes = list(notes or [])
        self.params = params if params is not None else pd.DataFrame()
        self.reference = reference
        self.n_obs = n_obs
        self.n_events = n_events
        self.n_groups = n_groups
        self.model_result = model_result
        self.formula = formula

    def summary_frame(self) -> pd.DataFrame:
        """The coefficient table (empty when not fitted)."""
        return self.params.copy()

    def summary(self) -> str:
        """Text of the hazard ratios, or why the model could not be fitted."""
        lines = [
            "Cox proportional hazards of relapse during wash-out (robust SE clustered by patient)",
            f"Model: {self.formula}",
        ]
        if not self.fitted:
            lines.append(f"NOT FITTED: {self.message}")
        else:
            lines.append(
                f"Trajectories: {self.n_obs}; relapses: {self.n_events}; patients: {self.n_groups}"
            )
            lines.append(frame_to_text(self.params, 3))
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def cox(
    ttr: pd.DataFrame,
    *,
    reference: str | None = None,
    duration: bool = True,
    duration_scale: float = 100.0,
    ties: str = "efron",
) -> CoxModel:
    """Cox model ``hazard ~ arm (+ maintenance duration)`` with patient-clustered SEs.

    Fitted with ``statsmodels`` ``PHReg`` (``fit(groups=patient)`` gives the
    robust sandwich covariance).  An arm without any relapse has a hazard
    ratio of 0 against any arm with relapses (log-hazard -inf, monotone
    likelihood); it is left out with a note rather than reported as a huge
    negative coefficient.

    Parameters
    ----------
    ttr : pandas.DataFrame
        From :func:`time_to_relapse`.
    reference : str, optional
        Reference arm (default: the first arm with relapses).
    duration : bool
        Include maintenance duration (per ``duration_scale`` epochs).
    duration_scale : float
        Epochs per unit of the duration covariate.
    ties : {"efron", "breslow"}
        Handling of tied steps.

    Returns
    -------
    CoxModel

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.survival import cox, time_to_relapse
    >>> m = cox(time_to_relapse(make_results(n_patients=6, seed=0)))
    >>> m.fitted, m.reference
    (True, 'ssri')
    """
    from statsmodels.duration.hazard_regression import PHReg

    ttr = _check_ttr(ttr)
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if not duration_scale > 0:
        raise ValueError(f"duration_scale must be > 0, got {duration_scale}")
    notes = []
    keep = []
    for arm in _arms(ttr, None):
        k = int(ttr.loc[ttr["arm"] == arm, "event"].sum())
        if k == 0:
            notes.append(
                f"{arm} left out: no relapse in any trajectory, so its hazard ratio is 0 "
                "(log-hazard -inf) and not estimable"
            )
        else:
            keep.append(arm)
    formula = "hazard ~ arm" + (f" + duration (per {duration_scale:g} epochs)" if duration else "")
    if not keep:
        return CoxModel(
            fitted=False, message="no relapse in any arm", notes=notes, formula=formula
        )
    if reference is None:
        reference = keep[0]
    elif reference not in keep:
        raise ValueError(f"reference arm {reference!r} not among arms with relapses {keep}")
    data = ttr[ttr["arm"].isin(keep)].reset_index(drop=True)
    others = [a for a in keep if a != reference]
    cols, names = [], []
    for arm in others:
        cols.append((data["arm"] == arm).to_numpy(dtype=float))
        names.append(f"arm[{arm}]")
    if duration and data["maintenance_epochs"].nunique() > 1:
        cols.append(data["maintenance_epochs"].to_numpy(dtype=float) / duration_scale)
        names.append("duration")
    formula = "hazard ~ " + " + ".join(names) if names else "hazard ~ (no covariates)"
    formula += f" (reference {reference})"
    if not cols:
        return CoxModel(
            fitted=False,
            message="no covariate left to estimate",
            notes=notes,
            reference=reference,
            formula=formula,
        )
    exog = np.column_stack(cols)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PHReg(
                data["time"].to_numpy(dtype=float),
                exog,
                status=data["event"].to_numpy(dtype=int),
                ties=ties,
            )
            res = model.fit(groups=data["patient"].to_numpy())
        except (ValueError, np.linalg.LinAlgError) as exc:
            return CoxModel(
                fitted=False,
                message=f"PHReg failed: {exc}",
                notes=notes,
                reference=reference,
                formula=formula,
            )
    for w in caught:
        msg = str(w.message).strip().splitlines()[0]
        if "converge" in msg.lower():
            notes.append(f"statsmodels warned: {msg}")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = np.asarray(res.params, dtype=float)
        bse = np.asarray(res.bse, dtype=float)
        pvalues = np.asarray(res.pvalues, dtype=float)
        ci = np.asarray(res.conf_int(), dtype=float)
    if not np.all(np.isfinite(params)) or np.any(np.abs(params) > 15):
        return CoxModel(
            fitted=False,
            notes=notes,
            reference=reference,
            formula=formula,
            message="monotone likelihood (an arm's relapses all precede or all follow "
            "the others'): hazard ratios not estimable",
        )
    if not np.all(np.isfinite(bse) & (bse > 0.0)):
        return CoxModel(
            fitted=False,
            notes=notes,
            reference=reference,
            formula=formula,
            message="degenerate partial likelihood (e.g. every relapse tied at the same step; "
            "zero or undefined standard errors): hazard ratios not estimable",
        )
    frame = pd.DataFrame(
        {
            "term": names,
            "coef": params,
            "std_err": bse,
            "z": params / bse,
            "pvalue": pvalues,
            "conf_int_low": ci[:, 0],
            "conf_int_high": ci[:, 1],
            "hazard_ratio": np.exp(params),
            "hr_conf_int_low": np.exp(ci[:, 0]),
            "hr_conf_int_high": np.exp(ci[:, 1]),
        }
    )
    return CoxModel(
        fitted=True,
        notes=notes,
        params=frame,
        reference=reference,
        n_obs=len(data),
        n_events=int(data["event"].sum()),
        n_groups=int(data["patient"].nunique()),
        model_result=res,
        formula=formula,
    )
