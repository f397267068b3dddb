"""A run beside a family sheet: its published numbers (:func:`compare_published`) and its findings
(:func:`decide_findings`), each a results object with ``summary()`` and ``summary_frame()``."""

from __future__ import annotations

import math

import pandas as pd

from analysis._data import check_results, display_name
from analysis._results import FrameResults, fmt_num, frame_to_text
from analysis.family._rules import ALPHA
from analysis.family._sheet import NotTestable, Sheet

__all__ = ["FindingResults", "PublishedComparison", "compare_published", "decide_findings", "differs_margin"]

#: The verdicts of :func:`compare_published`.
WITHIN, DIFFERS, ABSENT = "within spread", "differs", "not in this run"

#: The verdicts of :func:`decide_findings`.
HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable"

#: One sentence stating the ``differs`` rule (the report prints it under the table).
DIFFERS_RULE = (
    "A row differs when our mean and the published one are further apart than twice the standard error of "
    "their difference, sqrt(SD_ours^2 / n_ours + SD_published^2 / n_published), plus half a unit of the "
    "published value's last printed digit; where the sheet prints no SD (a single seed), than twice our SD "
    "as the spread of one new patient, 2 SD_ours sqrt(1 + 1 / n_ours), plus the same half unit. SDs are "
    "population SDs (ddof = 0), as the sheets print them."
)


def differs_margin(sd_ours: float, n_ours: int, sd_published: float | None, n_published: int, decimals: int) -> float:
    """How far apart our mean and a published one may be and still be ``within spread``.

    ``2 sqrt(sd_ours^2 / n_ours + sd_published^2 / n_published) + 0.5 * 10^-decimals``; where the
    sheet prints no SD (``sd_published`` None), ``2 sd_ours sqrt(1 + 1 / n_ours) + 0.5 *
    10^-decimals`` (our spread for a single new patient). SDs are population SDs.

    Examples
    --------
    >>> round(differs_margin(3.0, 10, 4.0, 10, 1), 4)  # 2 sqrt(0.9 + 1.6) + 0.05
    3.2123
    >>> round(differs_margin(3.0, 9, None, 1, 0), 4)   # 2 * 3 * sqrt(10 / 9) + 0.5
    6.8246
    """
    if n_ours < 1 or n_published < 1:
        raise ValueError(f"both n must be >= 1, got n_ours={n_ours}, n_published={n_published}")
    rounding = 0.5 * 10.0 ** (-decimals)
    if sd_published is None:
        return 2.0 * sd_ours * math.sqrt(1.0 + 1.0 / n_ours) + rounding
    return 2.0 * math.sqrt(sd_ours**2 / n_ours + sd_published**2 / n_published) + rounding


def _sheet(sheet: Sheet | str) -> Sheet:
    if isinstance(sheet, Sheet):
        return sheet
    if isinstance(sheet, str):
        from analysis.family import SHEETS

        if sheet not in SHEETS:
            raise ValueError(f"no published sheet {sheet!r}; known: {sorted(SHEETS)}")
        return SHEETS[sheet]
    raise TypeError(f"sheet must be a Sheet or a sheet id, got {type(sheet).__name__}")


def _one_cohort(results: object) -> pd.DataFrame:
    df = check_results(results)
    if "cohort" in df and df["cohort"].nunique() > 1:
        raise ValueError(
            f"results hold {df['cohort'].nunique()} cohorts; compare one at a time, e.g. results[results.cohort == 0]"
        )
    return df


class PublishedComparison(FrameResults):
    """A run's numbers beside a sheet's published ones, from :func:`compare_published`.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per (quantity, arm) with a published value: ``quantity, arm, published_mean,
        published_sd, n_published, n, mean, sd, conf_int_low, conf_int_high, difference, margin,
        verdict, decimals``. ``sd`` is our population SD, the interval the t interval of our mean,
        ``difference`` ours minus published, ``margin`` the distance the ``differs`` rule allows.
    sheet : Sheet
    """

    def __init__(self, frame: pd.DataFrame, sheet: Sheet, confidence: float) -> None:
        super().__init__(frame, confidence)
        self.sheet = sheet

    @property
    def n_differs(self) -> int:
        """Rows whose verdict is ``differs``."""
        return int((self.frame["verdict"] == DIFFERS).sum())

    def rows(self) -> list[list[str]]:
        """The table as printed strings: quantity, arm, published, n, ours, n, CI, difference, verdict."""
        out = []
        for _, r in self.frame.iterrows():
            d = int(r["decimals"])
            pub = fmt_num(r["published_mean"], d)
            if not math.isnan(r["published_sd"]):
                pub += f" ± {fmt_num(r['published_sd'], d)}"
            if r["n"] == 0:
                ours = ci = diff = "-"
            else:
                ours = f"{fmt_num(r['mean'], d)} ± {fmt_num(r['sd'], d)}"
                ci = ("-" if math.isnan(r["conf_int_low"])
                      else f"[{fmt_num(r['conf_int_low'], d)}, {fmt_num(r['conf_int_high'], d)}]")
                diff = fmt_num(r["difference"], d + 1)
            out.append([r["quantity"], display_name(r["arm"]), pub, str(int(r["n_published"])), ours,
                        str(int(r["n"])), ci, diff, r["verdict"]])
        return out

    #: Column names of :meth:`rows`.
    HEADER = ["quantity", "arm", "published", "n pub.", "ours", "n", "95 % CI (t)", "difference", "verdict"]

    def summary(self) -> str:
        """The sheet's table, ours beside it, with the ``differs`` rule and the sheet's notes."""
        counts = self.frame["verdict"].value_counts()
        head = (f"Sheet {self.sheet.id} ({self.sheet.title}; {self.sheet.source}), mean ± population SD: "
                + ", ".join(f"{counts.get(v, 0)} {v}" for v in (WITHIN, DIFFERS, ABSENT)))
        body = frame_to_text(pd.DataFrame(self.rows(), columns=self.HEADER))
        notes = "\n".join(f"Note: {n}" for n in self.sheet.notes)
        return "\n".join(part for part in (head, body, DIFFERS_RULE, notes) if part)


def compare_published(results: pd.DataFrame, sheet: Sheet | str, *, confidence: float = 0.95) -> PublishedComparison:
    """Put a run's numbers beside a family sheet's published ones and say where they differ.

    For each (quantity, arm) with a published value, reads one value per patient from the run
    (:attr:`Quantity.per_patient`) and compares our mean with the published mean. **Rule for
    "differs"**: the difference of the two means exceeds twice its standard error, sqrt(sd_ours^2 /
    n_ours + sd_pub^2 / n_pub), plus half a unit of the published value's last printed digit
    (``Quantity.decimals``: the sheet rounded it); where the sheet prints no SD (a single seed,
    068A), the allowance is our spread for one new patient, 2 sd_ours sqrt(1 + 1 / n_ours), plus the
    same half unit (:func:`differs_margin`). SDs are population SDs (ddof = 0), as the sheets print.
    A row the run has no value for is ``not in this run``.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results of one cohort of the sheet's study.
    sheet : Sheet or str
        The sheet, or its id in :data:`analysis.family.SHEETS`.
    confidence : float
        Level of the t interval of our mean.

    Returns
    -------
    PublishedComparison

    Raises
    ------
    TypeError
        ``results`` is not a DataFrame or ``sheet`` neither a Sheet nor a str.
    ValueError
        The results miss schema columns or hold several cohorts, the sheet id is unknown, or
        ``confidence`` is not in (0, 1).

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.family import Quantity, Sheet, compare_published
    >>> from analysis.family._rows import acute
    >>> sheet = Sheet("X", "demo", "-", 10, ("ketamine",), (Quantity("combined %", acute("accuracy", "combined")),),
    ...               {("combined %", "ketamine"): (97.0, 0.5)}, ())
    >>> rows = pd.DataFrame([dict(patient=p, arm="ketamine", phase="acute", metric="accuracy",
    ...                           condition="combined", noise_sigma=None, maintenance_epochs=None,
    ...                           step=None, value=v) for p, v in enumerate([96.5, 97.5, 97.0])])
    >>> row = compare_published(rows, sheet).frame.iloc[0]
    >>> int(row["n"]), float(row["mean"]), row["verdict"]
    (3, 97.0, 'within spread')
    """
    from analysis.summaries import t_ci

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sheet = _sheet(sheet)
    df = _one_cohort(results)
    records = []
    for q in sheet.quantities:
        for arm in sheet.arms:
            if (q.name, arm) not in sheet.published:
                continue
            pub_mean, pub_sd = sheet.published[(q.name, arm)]
            values = q.per_patient(df, arm).dropna().to_numpy(dtype=float)
            n = int(values.size)
            rec = {"quantity": q.name, "arm": arm, "published_mean": float(pub_mean),
                   "published_sd": math.nan if pub_sd is None else float(pub_sd),
                   "n_published": sheet.n_published, "n": n}
            if n == 0:
                rec.update(mean=math.nan, sd=math.nan, conf_int_low=math.nan, conf_int_high=math.nan,
                           difference=math.nan, margin=math.nan, verdict=ABSENT)
            else:
                mean, sd = float(values.mean()), float(values.std(ddof=0))
                lo, hi = t_ci(values, confidence)
                diff = mean - float(pub_mean)
                margin = differs_margin(sd, n, pub_sd, sheet.n_published, q.decimals)
                rec.update(mean=mean, sd=sd, conf_int_low=lo, conf_int_high=hi, difference=diff, margin=margin,
                           verdict=DIFFERS if abs(diff) > margin else WITHIN)
            rec["decimals"] = q.decimals
            records.append(rec)
    columns = ["quantity", "arm", "published_mean", "published_sd", "n_published", "n", "mean", "sd",
               "conf_int_low", "conf_int_high", "difference", "margin", "verdict", "decimals"]
    return PublishedComparison(pd.DataFrame.from_records(records, columns=columns), sheet, confidence)


class FindingResults(FrameResults):
    """A sheet's findings decided on a run, from :func:`decide_findings`.

    Attributes
    ----------
    frame : pandas.DataFrame
        ``id, finding, test, verdict, detail``; verdict ``holds``, ``does not hold`` or
        ``not testable`` (the detail then says what the run lacks).
    sheet : Sheet
    alpha : float
        Significance level of the deciding tests (after Holm within a finding).
    """

    def __init__(self, frame: pd.DataFrame, sheet: Sheet, alpha: float) -> None:
        super().__init__(frame, 1.0 - alpha)
        self.sheet = sheet
        self.alpha = alpha

    @property
    def n_hold(self) -> int:
        """Findings that hold."""
        return int((self.frame["verdict"] == HOLDS).sum())

    def summary(self) -> str:
        """One line per finding: id, verdict, finding, deciding test, detail."""
        counts = self.frame["verdict"].value_counts()
        head = (f"Findings of sheet {self.sheet.id} (alpha = {self.alpha}): "
                + ", ".join(f"{counts.get(v, 0)} {v}" for v in (HOLDS, FAILS, UNTESTABLE)))
        return head + "\n" + frame_to_text(self.frame[["id", "verdict", "finding", "test", "detail"]])


def decide_findings(results: pd.DataFrame, sheet: Sheet | str) -> FindingResults:
    """Decide each of a family sheet's findings on a run.

    Each :class:`Finding` states its rule (``Finding.test``): one-sided paired Wilcoxon signed-rank
    tests across patients for orderings (Holm within the finding, significance level
    :data:`analysis.family._rules.ALPHA`), a one-sided t bound for "keeps", stated thresholds for
    descriptive statements, with Wilson 95 % intervals for shares.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results of one cohort of the sheet's study.
    sheet : Sheet or str
        The sheet, or its id in :data:`analysis.family.SHEETS`.

    Returns
    -------
    FindingResults

    Raises
    ------
    TypeError, ValueError
        As :func:`compare_published`.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.family import decide_findings
    >>> rows = pd.DataFrame([dict(patient=0, arm="untreated", phase="pruned", metric="sparsity", condition="",
    ...                           noise_sigma=None, maintenance_epochs=None, step=None, value=95.0)])
    >>> decide_findings(rows, "068C").frame["verdict"].unique().tolist()
    ['not testable']
    """
    sheet = _sheet(sheet)
    df = _one_cohort(results)
    records = []
    for f in sheet.findings:
        try:
            ok, detail = f.decide(df)
            verdict = HOLDS if ok else FAILS
        except NotTestable as exc:
            verdict, detail = UNTESTABLE, str(exc)
        records.append({"id": f.id, "finding": f.text, "test": f.test, "verdict": verdict, "detail": detail})
    return FindingResults(pd.DataFrame.from_records(records, columns=["id", "finding", "test", "verdict", "detail"]),
                          sheet, ALPHA)
