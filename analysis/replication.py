"""Replication of qualitative claims across cohorts, and the cohort size a claim needs.

A replication study runs the same protocol on several independent cohorts;
its results carry a ``cohort`` column (int).  A *claim evaluator* is any
callable ``decide(frame) -> {claim_id: True | False | None}`` that decides
each claim on one cohort's results (``None``: the claim cannot be tested on
that cohort); the caller passes the paper's evaluator, and this module stays
general (it imports nothing from the simulation or the paper's analysis):

- :func:`wilson_ci` - the Wilson score interval of a binomial proportion;
- :func:`replication_table` - per claim, the share of cohorts in which it
  holds, with a Wilson interval, the number of cohorts and of testable ones;
- :func:`smallest_cohort` - per claim, the smallest cohort size at which it
  holds in at least ``target`` of cohorts drawn by resampling patients, and
  the share-versus-size curve (:meth:`CohortSizeCurve.plot`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis._results import ResultsBase, fmt_num, frame_to_text

__all__ = [
    "CohortSizeCurve",
    "Replication",
    "plot_cohort_size",
    "replication_table",
    "smallest_cohort",
    "wilson_ci",
]

Decide = Callable[[pd.DataFrame], Mapping[str, "bool | None"]]


def _z(confidence: float) -> float:
    from scipy import stats

    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise TypeError(f"confidence must be a number, got {type(confidence).__name__}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return float(stats.norm.isf((1.0 - float(confidence)) / 2.0))


def wilson_ci(successes, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    ``centre = (p + z^2 / (2n)) / (1 + z^2 / n)`` and ``half-width = z /
    (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))`` with ``z`` the
    two-sided normal quantile, clipped to ``[0, 1]``.  Unlike the Wald
    interval it stays inside ``[0, 1]`` and keeps close to nominal coverage
    for the small counts (10-50 cohorts) of a replication study.  ``n = 0``
    gives NaN.

    Parameters
    ----------
    successes, n : int or array_like of int
        Counts, ``0 <= successes <= n``.
    confidence : float

    Returns
    -------
    (low, high) : numpy.ndarray
        Same shape as the broadcast inputs (0-d arrays for scalars).

    Examples
    --------
    >>> low, high = wilson_ci(8, 10)
    >>> round(float(low), 4), round(float(high), 4)
    (0.4902, 0.9433)
    """
    k = np.asarray(successes, dtype=float)
    m = np.asarray(n, dtype=float)
    if np.any(~np.isfinite(k)) or np.any(~np.isfinite(m)):
        raise ValueError("successes and n must be finite")
    if np.any(k != np.round(k)) or np.any(m != np.round(m)):
        raise ValueError("successes and n must be whole numbers")
    if np.any(m < 0) or np.any(k < 0) or np.any(k > m):
        raise ValueError("need 0 <= successes <= n")
    z = _z(confidence)
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / m
        denom = 1.0 + z2 / m
        centre = (p + z2 / (2.0 * m)) / denom
        half = z * np.sqrt(p * (1.0 - p) / m + z2 / (4.0 * m**2)) / denom
    low = np.clip(centre - half, 0.0, 1.0)
    high = np.clip(centre + half, 0.0, 1.0)
    return low, high


def _check_results(results: object, cohort_col: str | None) -> pd.DataFrame:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if results.empty:
        raise ValueError("results is empty (no rows)")
    need = ["patient"] + ([cohort_col] if cohort_col else [])
    missing = [c for c in need if c not in results.columns]
    if missing:
        raise ValueError(f"results is missing column(s) {missing}")
    return results


def _decisions(decide: Decide, frame: pd.DataFrame, where: str) -> dict[str, bool | None]:
    if not callable(decide):
        raise TypeError(f"decide must be callable, got {type(decide).__name__}")
    try:
        out = decide(frame)
    except Exception as exc:
        exc.add_note(f"raised by decide() on {where}")
        raise
    if not isinstance(out, Mapping):
        raise TypeError(f"decide() must return a mapping claim -> bool | None, got {type(out).__name__} on {where}")
    clean: dict[str, bool | None] = {}
    for claim, value in out.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            clean[str(claim)] = None
        elif isinstance(value, (bool, np.bool_)):
            clean[str(claim)] = bool(value)
        else:
            raise TypeError(
                f"decide() returned {type(value).__name__} for claim {claim!r} on {where}; expected bool or None"
            )
    return clean


def _share_table(decisions: pd.DataFrame, confidence: float, denominator: str) -> pd.DataFrame:
    """Per claim (columns of ``decisions``: True/False/None per draw): counts, share, Wilson interval."""
    rows = []
    for claim in decisions.columns:
        col = decisions[claim]
        testable = int(col.notna().sum())
        hold = int((col == True).sum())  # noqa: E712 - object column of True/False/None
        n = testable if denominator == "testable" else len(col)
        low, high = wilson_ci(hold, n, confidence)
        rows.append(
            {
                "claim": claim,
                "n_cohorts": len(col),
                "n_testable": testable,
                "n_hold": hold,
                "share": hold / n if n else math.nan,
                "conf_int_low": float(low),
                "conf_int_high": float(high),
            }
        )
    return pd.DataFrame(
        rows, columns=["claim", "n_cohorts", "n_testable", "n_hold", "share", "conf_int_low", "conf_int_high"]
    )


class Replication(ResultsBase):
    """How often each claim holds across cohorts (from :func:`replication_table`).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per claim: ``claim, n_cohorts, n_testable, n_hold, share``
        (``n_hold / n_testable``), ``conf_int_low, conf_int_high`` (Wilson).
    decisions : pandas.DataFrame
        Cohorts x claims: True, False or None (not testable).
    confidence : float
    """

    def __init__(self, table: pd.DataFrame, decisions: pd.DataFrame, confidence: float) -> None:
        self.table = table
        self.decisions = decisions
        self.confidence = confidence

    @property
    def share(self) -> pd.Series:
        """Share of testable cohorts in which each claim holds."""
        return self.table.set_index("claim")["share"]

    def conf_int(self) -> pd.DataFrame:
        """Wilson interval of the share per claim: columns ``lower, upper``."""
        t = self.table.set_index("claim")
        return pd.DataFrame({"lower": t["conf_int_low"], "upper": t["conf_int_high"]})

    def summary_frame(self) -> pd.DataFrame:
        """The per-claim table (a copy)."""
        return self.table.copy()

    def summary(self) -> str:
        """Paper-style text: per claim, holds in k of n testable cohorts (share, Wilson CI)."""
        pct = f"{100 * self.confidence:g}%"
        frame = self.table.rename(columns={"conf_int_low": f"{pct} low", "conf_int_high": f"{pct} high"})
        return "\n".join(
            [
                f"Replication of claims across {len(self.decisions)} cohorts",
                frame_to_text(frame, 3),
                "Share: cohorts in which the claim holds / cohorts in which it could be tested; Wilson score interval.",
            ]
        )


def replication_table(
    results: pd.DataFrame, decide: Decide, cohort_col: str = "cohort", *, confidence: float = 0.95
) -> Replication:
    """The share of cohorts in which each claim holds, with a Wilson score interval.

    ``decide`` is called once per cohort on that cohort's rows (the cohort
    column kept); a claim absent from a cohort's answer counts as not
    testable there.  The share is ``n_hold / n_testable``: a cohort in which
    a claim cannot be tested is neither a success nor a failure, and
    ``n_testable`` is reported beside it.  The Wilson interval treats the
    cohorts as independent Bernoulli trials (true of independent cohorts,
    not of cohorts resampled from one pool; see :func:`smallest_cohort`).

    Parameters
    ----------
    results : pandas.DataFrame
        Results of several cohorts, with a ``cohort_col`` column.
    decide : callable
        ``decide(frame) -> {claim_id: bool | None}``.
    cohort_col : str
        Name of the cohort column.
    confidence : float
        Level of the Wilson interval.

    Returns
    -------
    Replication

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"cohort": [0, 0, 1, 1, 2, 2], "patient": [0, 1] * 3,
    ...                    "value": [1.0, 2.0, -1.0, 3.0, 2.0, 2.0]})
    >>> rep = replication_table(df, lambda f: {"positive_mean": bool(f["value"].mean() > 1)})
    >>> rep.table[["claim", "n_cohorts", "n_hold", "share"]].values.tolist()
    [['positive_mean', 3, 2, 0.6666666666666666]]
    """
    _z(confidence)
    if not isinstance(cohort_col, str):
        raise TypeError(f"cohort_col must be a str, got {type(cohort_col).__name__}")
    df = _check_results(results, cohort_col)
    if df[cohort_col].isna().any():
        raise ValueError(f"column {cohort_col!r} has missing values")
    per_cohort = {}
    for cohort, frame in df.groupby(cohort_col, sort=True):
        per_cohort[cohort] = _decisions(decide, frame, f"{cohort_col} {cohort!r}")
    decisions = pd.DataFrame.from_dict(per_cohort, orient="index").astype(object)
    decisions = decisions.where(decisions.notna(), None)
    decisions.index.name = cohort_col
    return Replication(_share_table(decisions, confidence, "testable"), decisions, float(confidence))


# ---------------------------------------------------------------------------
# Smallest cohort
# ---------------------------------------------------------------------------


class CohortSizeCurve(ResultsBase):
    """Share of resampled cohorts in which each claim holds, by cohort size (from :func:`smallest_cohort`).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per claim: ``claim, smallest_size`` (NaN when no tested size
        reaches the target), ``share_at_smallest, conf_int_low,
        conf_int_high`` (Wilson, at that size), ``max_share``.
    curve : pandas.DataFrame
        One row per claim and size: ``claim, size, n_cohorts, n_testable,
        n_hold, share`` (``n_hold / n_cohorts``), ``conf_int_low,
        conf_int_high``.
    target, confidence : float
    replace : bool
        Whether patients were drawn with replacement.
    pool_size : int
        Patients available to draw from.
    """

    def __init__(self, table, curve, *, target, confidence, replace, pool_size):
        self.table = table
        self.curve = curve
        self.target = target
        self.confidence = confidence
        self.replace = replace
        self.pool_size = pool_size

    @property
    def smallest_size(self) -> pd.Series:
        """Smallest sufficient cohort size per claim (NaN: none of the sizes tried)."""
        return self.table.set_index("claim")["smallest_size"]

    def summary_frame(self) -> pd.DataFrame:
        """The per-claim table (a copy)."""
        return self.table.copy()

    def summary(self) -> str:
        """Paper-style text: per claim, the smallest cohort size reaching the target share."""
        how = "with" if self.replace else "without"
        return "\n".join(
            [
                f"Smallest cohort in which each claim holds in >= {100 * self.target:g}% of cohorts "
                f"(patients drawn {how} replacement from {self.pool_size})",
                frame_to_text(self.table, 3),
                "Smallest size: the first tested size from which the share stays >= target at every larger size.",
            ]
        )

    def plot(self):
        """Figure of share versus cohort size per claim (see :func:`plot_cohort_size`)."""
        return plot_cohort_size(self)


def _check_sizes(sizes: Sequence[int], pool: int, replace: bool) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence | np.ndarray):
        raise TypeError(f"sizes must be a sequence of ints, got {type(sizes).__name__}")
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"sizes must hold ints, got {s!r}")
        if s < 1:
            raise ValueError(f"cohort sizes must be >= 1, got {s}")
        if not replace and s > pool:
            raise ValueError(f"cohort size {s} exceeds the {pool} patients available to draw without replacement")
        out.append(int(s))
    if not out:
        raise ValueError("sizes is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"sizes has duplicates: {out}")
    return sorted(out)


def smallest_cohort(
    results: pd.DataFrame,
    decide: Decide,
    sizes: Sequence[int],
    target: float = 0.8,
    n_resamples: int = 200,
    seed: int = 0,
    *,
    replace: bool = False,
    confidence: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> CohortSizeCurve:
    """Per claim, the smallest cohort size at which it holds in at least ``target`` of drawn cohorts.

    For each size, ``n_resamples`` cohorts are drawn from the patients of
    ``results`` (``numpy.random.default_rng(seed)``), each given to
    ``decide``; a drawn cohort's patients are renumbered ``0..size-1`` (and a
    ``cohort`` column, when present, set to 0) so that it looks like one
    fresh cohort.  A patient is a ``patient`` id, or a ``(cohort,
    patient)`` pair when a ``cohort`` column is present (all cohorts pooled).

    By default patients are drawn **without replacement** (subsampling): a
    drawn cohort then holds distinct patients, as a real one does; drawing
    with replacement puts copies of a patient in a cohort, which makes
    within-cohort variation look smaller and the claims look easier to
    show.  Without replacement, cohorts of a size close to the pool overlap
    heavily and their shares are correlated (at the pool's size every draw
    is the same cohort), so sizes should stay well below the pool (half of
    it or less) for the share to estimate the chance of a fresh cohort.

    The share is ``n_hold / n_cohorts`` over all drawn cohorts: a cohort in
    which a claim cannot be tested (``None``) does not show it.  The smallest
    size is the first tested size from which the share stays ``>= target``
    at every larger tested size (a single noisy crossing is not enough).

    Parameters
    ----------
    results : pandas.DataFrame
        Pooled results with a ``patient`` column.
    decide : callable
        ``decide(frame) -> {claim_id: bool | None}``.
    sizes : sequence of int
        Cohort sizes to try.
    target : float
        Required share of cohorts (0-1).
    n_resamples : int
        Cohorts drawn per size.
    seed : int
    replace : bool
        Draw patients with replacement.
    confidence : float
        Level of the Wilson intervals of the shares.
    progress : callable, optional
        Called with 1 after each drawn cohort is decided (``len(sizes) *
        n_resamples`` calls), e.g. a progress bar's ``update``: deciding the
        paper's claims takes seconds per cohort.

    Returns
    -------
    CohortSizeCurve
        ``.table`` per claim, ``.curve`` per claim and size, ``.plot()``.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"patient": range(40), "value": [1.0] * 40})
    >>> res = smallest_cohort(df, lambda f: {"n>=10": len(f) >= 10}, sizes=[5, 10, 20], n_resamples=20)
    >>> res.table[["claim", "smallest_size"]].values.tolist()
    [['n>=10', 10.0]]
    """
    _z(confidence)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a share in (0, 1], got {target!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    df = _check_results(results, None)
    has_cohort = "cohort" in df.columns
    for col in ["patient", "cohort"] if has_cohort else ["patient"]:
        if df[col].isna().any():
            raise ValueError(f"column {col!r} has missing values")
    keys = ["cohort", "patient"] if has_cohort else ["patient"]
    ids = pd.MultiIndex.from_frame(df[keys]) if has_cohort else pd.Index(df["patient"])
    codes, uniques = pd.factorize(ids)
    pool = len(uniques)
    sizes = _check_sizes(sizes, pool, replace)
    order = np.argsort(codes, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(codes, minlength=pool))[:-1])
    rng = np.random.default_rng(seed)

    curves = []
    for size in sizes:
        draws = []
        for r in range(n_resamples):
            pick = rng.choice(pool, size=size, replace=replace)
            frame = df.iloc[np.concatenate([rows_of[i] for i in pick])].reset_index(drop=True)
            frame["patient"] = np.repeat(np.arange(size), [len(rows_of[i]) for i in pick])
            if has_cohort:
                frame["cohort"] = 0
            draws.append(_decisions(decide, frame, f"a drawn cohort of size {size} (draw {r})"))
            if progress is not None:
                progress(1)
        decisions = pd.DataFrame(draws).astype(object)
        decisions = decisions.where(decisions.notna(), None)
        part = _share_table(decisions, confidence, "all")
        part.insert(1, "size", size)
        curves.append(part)
    curve = pd.concat(curves, ignore_index=True)
    curve["claim"] = curve["claim"].astype(str)

    rows = []
    for claim, g in curve.groupby("claim", sort=False):
        g = g.sort_values("size")
        ok = (g["share"] >= target).to_numpy()
        # first index from which every later size also reaches the target
        tail_ok = np.flip(np.logical_and.accumulate(np.flip(ok)))
        hit = np.flatnonzero(tail_ok)
        row = {"claim": claim, "smallest_size": math.nan, "share_at_smallest": math.nan,
               "conf_int_low": math.nan, "conf_int_high": math.nan, "max_share": float(g["share"].max())}
        if hit.size:
            best = g.iloc[int(hit[0])]
            row.update(smallest_size=float(best["size"]), share_at_smallest=float(best["share"]),
                       conf_int_low=float(best["conf_int_low"]), conf_int_high=float(best["conf_int_high"]))
        rows.append(row)
    return CohortSizeCurve(
        pd.DataFrame(rows), curve, target=float(target), confidence=float(confidence), replace=replace, pool_size=pool
    )


def plot_cohort_size(result: CohortSizeCurve):
    """Share of drawn cohorts in which each claim holds versus cohort size, with Wilson bands.

    Parameters
    ----------
    result : CohortSizeCurve
        From :func:`smallest_cohort`.

    Returns
    -------
    matplotlib.figure.Figure
        One line per claim, its Wilson band shaded, the target as a dashed
        line; rendered with Agg, no pyplot state touched.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"patient": range(20), "value": 1.0})
    >>> res = smallest_cohort(df, lambda f: {"c": len(f) > 4}, sizes=[3, 6], n_resamples=5)
    >>> len(plot_cohort_size(res).axes)
    1
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(result, CohortSizeCurve):
        raise TypeError(f"result must be a CohortSizeCurve, got {type(result).__name__}")
    fig = Figure(figsize=(6.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    smallest = result.smallest_size
    many = result.curve["claim"].nunique() > 8  # the paper's 24 claims: faint bands, a legend beside the axes
    band = 0.04 if many else 0.15
    for k, (claim, g) in enumerate(result.curve.groupby("claim", sort=False)):
        color = f"C{k % 10}"
        s = smallest.get(claim, math.nan)
        label = f"{claim} (n >= {fmt_num(s, 0)})" if np.isfinite(s) else f"{claim} (not reached)"
        ax.plot(g["size"], g["share"], marker=markers[k % len(markers)], color=color, label=label)
        ax.fill_between(g["size"], g["conf_int_low"], g["conf_int_high"], color=color, alpha=band)
    ax.axhline(result.target, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("cohort size (patients)")
    ax.set_ylabel("share of cohorts in which the claim holds")
    how = "with" if result.replace else "without"
    ax.set_title(f"Claims vs cohort size ({result.curve['n_cohorts'].iloc[0]} draws {how} replacement per size)",
                 fontsize=10)
    if many:
        fig.set_size_inches(9.0, 6.0)
        ax.legend(fontsize=7, frameon=False, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.legend(fontsize=8, frameon=False)
    return fig
