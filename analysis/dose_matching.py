"""Comparing mechanisms at equal "dose" of weight change (iso-dose matching).

A dose sweep runs every arm at several settings of its own parameter (a
regrowth fraction, a course length, a damping strength).  These settings have
no common unit, so sheet 068A measures each configuration's *dose* as the
change it made to the weights (mean absolute change L1, and L2, turnover and
change in sparsity; 068A fact 7) and compares the arms at matched doses:

- :func:`dose_table` - per arm and configuration, the means over patients of
  the dose metrics, the acute accuracies, the improvement over the untreated
  network, the relapse drop, the off-medication reversal and the efficiency
  ``improvement / (dose + 1e-8)`` (068A facts 5 and 7);
- :func:`iso_dose_match` - dose targets from the arms' overlapping dose range
  (or, when the ranges do not overlap, percentiles of the pooled doses), the
  configuration of each arm nearest each target, and the arms ranked at each
  target (068A facts 8-9);
- :func:`arm_sweep_summary` - per arm over its whole sweep: dose range, best
  and worst improvement and relapse drop, efficiency (068A fact 10).

The module is general: it reads plain columns (``patient``, ``arm``,
``phase``, ``metric``, ``condition``, ``noise_sigma``, ``value``) and the
sweep's columns, named by dotted path (``arms.ssri.epochs``), and imports
nothing from the simulation or the paper-specific analysis.  When a
``cohort`` column is present, a patient is identified by ``(cohort,
patient)``.

Matching picks the *nearest* configuration; nothing guarantees it is near.
When the arms' dose ranges do not overlap, the matched doses can differ by
orders of magnitude, and the "iso-dose" comparison is not at equal dose: read
``dose_minus_target`` before reading the rankings (``docs/dose-response.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis._results import ResultsBase, fmt_num, frame_to_text

__all__ = [
    "ArmSweepSummary",
    "DoseTable",
    "IsoDoseMatch",
    "arm_sweep_summary",
    "dose_table",
    "iso_dose_match",
]

#: Added to the dose in the efficiency's denominator (068A fact 7).
EFFICIENCY_EPS = 1e-8

#: The dose metrics a ``dose`` phase reports (068A fact 7), in table order.
DOSE_METRICS = ("dose_l1", "dose_l2", "turnover", "sparsity_change")

#: The columns every analysed results table must have.
REQUIRED_COLUMNS = ("patient", "arm", "phase", "metric", "value")

#: Per-configuration columns of :attr:`DoseTable.table` that hold outcomes (means over patients).
OUTCOMES = (
    "clean",
    "standard",
    "combined",
    "extreme",
    "improvement",
    "relapse_drop",
    "reversal",
    "sparsity_after_relapse",
    "efficiency",
)

#: The rankings at each target: (name, column, descending).
RANKINGS = (("combined", "combined", True), ("relapse drop", "relapse_drop", False), ("efficiency", "efficiency", True))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _fmt_setting(value: object) -> str:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return format(float(value), ".12g")
    return str(value)


def _sig(x: float) -> str:
    """A dose with 3 significant digits (doses span orders of magnitude); ``n/a`` for NaN."""
    return "n/a" if x is None or not np.isfinite(x) else f"{float(x):.3g}"


def _short(label: str) -> str:
    """``"arms.ssri.epochs=10"`` -> ``"epochs=10"`` (each part of a label; ``-`` for none)."""
    if not label:
        return "-"
    out = []
    for part in label.split(", "):
        name, sep, value = part.partition("=")
        out.append(f"{name.rsplit('.', 1)[-1]}={value}" if sep else part)
    return ", ".join(out)


def _swept_columns(results: pd.DataFrame, swept: str | Sequence[str] | None) -> list[str]:
    if swept is None:
        return [c for c in results.columns if isinstance(c, str) and "." in c]
    cols = [swept] if isinstance(swept, str) else list(swept)
    if not all(isinstance(c, str) for c in cols):
        raise TypeError("swept must be a column name or a sequence of column names")
    missing = [c for c in cols if c not in results.columns]
    if missing:
        raise ValueError(f"results is missing swept column(s) {missing}")
    return cols


def _labels(frame: pd.DataFrame, swept: list[str]) -> pd.Series:
    """``"col=value, ..."`` of the swept columns set on each row ("" where none is)."""
    if not swept:
        return pd.Series("", index=frame.index)
    parts = []
    for col in swept:
        values = frame[col]
        parts.append(values.map(lambda v, c=col: "" if pd.isna(v) else f"{c}={_fmt_setting(v)}"))
    joined = pd.concat(parts, axis=1).apply(lambda r: ", ".join(p for p in r if p), axis=1)
    return joined.astype(str)


def _check_results(results: pd.DataFrame) -> None:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if results.empty:
        raise ValueError("results is empty (no rows)")
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results is missing column(s) {missing}")
    if not pd.api.types.is_numeric_dtype(results["value"]) or pd.api.types.is_bool_dtype(results["value"]):
        raise ValueError(f"column 'value' must be numeric, got dtype {results['value'].dtype}")


def _values(
    rows: pd.DataFrame,
    keys: list[str],
    phase: str,
    metric: str,
    condition: str | None = None,
    sigma: float | None = None,
) -> pd.Series:
    """One value per ``keys`` for a phase/metric (/condition/noise sigma); empty when absent."""
    sel = rows[(rows["phase"] == phase) & (rows["metric"] == metric)]
    if condition is not None:
        if "condition" not in sel.columns:
            return pd.Series(dtype=float)
        sel = sel[sel["condition"] == condition]
    if sigma is not None:
        if "noise_sigma" not in sel.columns:
            return pd.Series(dtype=float)
        sel = sel[np.isclose(sel["noise_sigma"].to_numpy(dtype=float), sigma)]
    sel = sel[np.isfinite(sel["value"].to_numpy(dtype=float))]
    if sel.empty:
        return pd.Series(dtype=float)
    dup = sel.duplicated(keys, keep=False)
    if dup.any():
        what = f"{phase}/{metric}" + (f"/{condition}" if condition else "")
        first = sel.loc[dup, keys].iloc[0].tolist()
        raise ValueError(
            f"several {what} rows for one arm, configuration and patient (first: {first}); "
            "a configuration must be identified by the swept columns (pass swept=)"
        )
    return sel.set_index(keys)["value"].astype(float)


def _as_table(table: DoseTable | pd.DataFrame) -> pd.DataFrame:
    if isinstance(table, DoseTable):
        frame = table.table
    elif isinstance(table, pd.DataFrame):
        frame = table
    else:
        raise TypeError(f"table must be a DoseTable or a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in ("arm", "label", "dose") if c not in frame.columns]
    if missing:
        raise ValueError(f"table is missing column(s) {missing}; build it with dose_table()")
    frame = frame[np.isfinite(pd.to_numeric(frame["dose"], errors="coerce").to_numpy(dtype=float))]
    if frame.empty:
        raise ValueError("table has no configuration with a finite dose (no dose rows)")
    return frame


# ---------------------------------------------------------------------------
# The dose table
# ---------------------------------------------------------------------------


class DoseTable(ResultsBase):
    """Per arm and configuration: dose metrics and outcomes, means over patients.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per arm and configuration: ``arm``, ``parameter`` (the swept
        column(s) set for the arm), ``setting`` (its value when one numeric
        column is set, else NaN), ``label`` (``"column=value, ..."``), ``n``
        (patients with a dose), ``dose`` (the mean of ``dose_metric``), the
        mean of each dose metric present (``dose_l1, dose_l2, turnover,
        sparsity_change``), ``clean, standard, combined, extreme`` (acute
        accuracy %, ``extreme`` at internal sigma ``extreme_sigma``),
        ``improvement`` (acute combined minus the untreated combined, per
        patient, then averaged), ``relapse_drop`` (points), ``reversal``
        (off-medication minus acute combined; NaN for arms without an
        off-medication test), ``sparsity_after_relapse`` and ``efficiency``
        (``improvement / (dose + 1e-8)``, from the means).  Columns whose
        rows are absent are NaN.
    untreated : pandas.Series
        The untreated network's means (``sparsity, clean, standard,
        combined, extreme``), taken once however many levels repeat it.
    dose_metric : str
    swept : list of str
        The swept columns that identify a configuration.
    """

    def __init__(self, table: pd.DataFrame, untreated: pd.Series, *, dose_metric: str, swept: list[str]) -> None:
        self.table = table
        self.untreated = untreated
        self.dose_metric = dose_metric
        self.swept = swept

    def summary_frame(self) -> pd.DataFrame:
        """The per-configuration table (a copy)."""
        return self.table.copy()

    def summary(self) -> str:
        """Paper-style text: one line per arm and configuration."""
        cols = ["arm", "label", "n", "dose", "combined", "extreme", "improvement", "relapse_drop", "reversal",
                "efficiency"]
        frame = self.table[cols].copy()
        frame["label"] = [_short(lab) for lab in frame["label"]]
        frame["dose"] = [_sig(v) for v in frame["dose"]]
        frame["efficiency"] = [fmt_num(v, 0) for v in frame["efficiency"]]
        unt = ", ".join(f"{k} {fmt_num(v, 1)}" for k, v in self.untreated.items() if np.isfinite(v))
        return "\n".join(
            [
                f"Dose ({self.dose_metric}) and outcome per configuration (means over patients)",
                frame_to_text(frame.rename(columns={"label": "setting"}), 1),
                f"Untreated (once): {unt or 'no rows'}.",
                "Improvement: acute combined - untreated combined (points); efficiency: improvement / (dose + 1e-8).",
            ]
        )


def dose_table(
    results: pd.DataFrame,
    dose_metric: str = "dose_l1",
    swept: str | Sequence[str] | None = None,
    *,
    dose_phase: str = "dose",
    acute: str = "acute",
    relapse: str = "sweep_relapse",
    off: str = "off_medication",
    untreated: str = "untreated",
    untreated_phase: str = "pruned",
    extreme_sigma: float = 2.5,
) -> DoseTable:
    """Per arm and configuration: dose of weight change and what it bought.

    A configuration is an arm at one level of the sweep, identified by the
    values of the swept columns set on its rows (in a one-field-at-a-time
    sweep, the arm's own field).  For each configuration and patient the
    function reads the dose metrics (phase ``dose_phase``), the acute
    clean / standard / combined accuracy and the accuracy at internal noise
    ``extreme_sigma`` (phase ``acute``), the relapse drop (phase ``relapse``,
    metric ``relapse_drop``), the off-medication combined accuracy (phase
    ``off``; arms without it get NaN) and the untreated combined accuracy
    (arm ``untreated``, phase ``untreated_phase``), and averages over
    patients.  Following 068A facts 5 and 7:

    - improvement = acute combined - untreated combined (percentage points);
    - reversal = off-medication combined - acute combined;
    - efficiency = mean improvement / (mean dose + 1e-8), with the dose
      ``dose_metric`` (L1, the mean absolute weight change, by default).

    A sweep repeats the untreated rows at every level.  Each configuration
    takes the untreated rows of its own level; when its level has none, the
    untreated rows of any level are used if every level agrees (a shared
    baseline), else a ``ValueError`` is raised.

    Parameters
    ----------
    results : pandas.DataFrame
        A tidy results table (``docs/results-schema.md``), with the sweep's
        columns.
    dose_metric : str
        The metric used as the dose (``dose_l1``, ``dose_l2``, ``turnover``,
        ``sparsity_change``).
    swept : str or sequence of str, optional
        The columns that identify a configuration (default: every column
        whose name is a dotted path, i.e. every swept field).
    dose_phase, acute, relapse, off, untreated, untreated_phase : str
        Phase and arm names (defaults: the 068A study file's labels).
    extreme_sigma : float
        Internal noise sigma of the ``extreme`` column.

    Returns
    -------
    DoseTable

    Raises
    ------
    TypeError
        ``results`` is not a DataFrame, or ``swept`` is not column names.
    ValueError
        Missing columns, no dose rows, several rows per configuration and
        patient, or untreated rows that differ between levels and are absent
        from some configuration's level.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [(0, "untreated", "pruned", "accuracy", "combined", None, 30.0),
    ...         (0, "a", "dose", "dose_l1", "", 0.1, 0.002), (0, "a", "acute", "accuracy", "combined", 0.1, 90.0),
    ...         (0, "a", "dose", "dose_l1", "", 0.2, 0.004), (0, "a", "acute", "accuracy", "combined", 0.2, 94.0)]
    >>> df = pd.DataFrame(rows, columns=["patient", "arm", "phase", "metric", "condition", "arms.a.x", "value"])
    >>> t = dose_table(df).table
    >>> t[["setting", "improvement"]].values.tolist(), t["efficiency"].round().tolist()
    ([[0.1, 60.0], [0.2, 64.0]], [30000.0, 16000.0])
    """
    _check_results(results)
    if not isinstance(dose_metric, str) or not dose_metric:
        raise TypeError(f"dose_metric must be a non-empty str, got {dose_metric!r}")
    cols = _swept_columns(results, swept)
    patient_keys = ["cohort", "patient"] if "cohort" in results.columns else ["patient"]

    wanted = {dose_phase, acute, relapse, off, untreated_phase}
    rows = results[results["phase"].isin(wanted)].copy()
    rows["label"] = _labels(rows, cols)
    keys = ["arm", "label", *patient_keys]

    doses = rows[(rows["phase"] == dose_phase) & (rows["arm"] != untreated)]
    if doses.empty or not (doses["metric"] == dose_metric).any():
        present = sorted(map(str, results.loc[results["phase"] == dose_phase, "metric"].unique()))
        raise ValueError(
            f"results hold no dose rows (phase {dose_phase!r}, metric {dose_metric!r}; present: {present}); "
            "the study needs a snapshot and a dose phase (docs/family.md)"
        )

    per = {}
    for metric in dict.fromkeys((dose_metric, *DOSE_METRICS)):
        s = _values(doses, keys, dose_phase, metric)
        if not s.empty:
            per[metric] = s
    treated = rows[rows["arm"] != untreated]
    per["clean"] = _values(treated, keys, acute, "accuracy", "clean")
    per["standard"] = _values(treated, keys, acute, "accuracy", "standard")
    per["combined"] = _values(treated, keys, acute, "accuracy", "combined")
    per["extreme"] = _values(treated, keys, acute, "accuracy", "internal_noise", extreme_sigma)
    per["relapse_drop"] = _values(treated, keys, relapse, "relapse_drop")
    per["sparsity_after_relapse"] = _values(treated, keys, relapse, "sparsity")
    off_combined = _values(treated, keys, off, "accuracy", "combined")

    wide = pd.DataFrame(index=per[dose_metric].index)
    for name, s in per.items():
        wide[name] = s.reindex(wide.index) if not s.empty else np.nan
    wide["reversal"] = (off_combined.reindex(wide.index) if not off_combined.empty else np.nan) - wide["combined"]

    unt_rows = rows[rows["arm"] == untreated]
    unt_comb = _values(unt_rows, keys, untreated_phase, "accuracy", "combined")
    wide["untreated_combined"] = _untreated_for(wide.index, unt_comb, patient_keys)
    wide["improvement"] = wide["combined"] - wide["untreated_combined"]

    means = wide.groupby(level=["arm", "label"], sort=False).mean()
    means.insert(0, "n", wide[dose_metric].groupby(level=["arm", "label"], sort=False).count())
    means = means.reset_index()
    means["dose"] = means[dose_metric]
    means["efficiency"] = means["improvement"] / (means["dose"] + EFFICIENCY_EPS)

    param, setting = _settings(rows, cols, means, untreated)
    means.insert(1, "parameter", param)
    means.insert(2, "setting", setting)
    order = {a: i for i, a in enumerate(dict.fromkeys(means["arm"]))}
    means = means.sort_values(
        ["arm", "setting", "label"], key=lambda s: s.map(order) if s.name == "arm" else s, na_position="last"
    )
    dose_cols = [m for m in dict.fromkeys((dose_metric, *DOSE_METRICS)) if m in means.columns]
    out_cols = ["arm", "parameter", "setting", "label", "n", "dose", *dose_cols, *OUTCOMES]
    table = means.reindex(columns=out_cols).reset_index(drop=True)
    table["n"] = table["n"].astype(int)

    unt_once = unt_rows.drop_duplicates([*patient_keys, "phase", "metric", "condition", "noise_sigma"]
                                        if {"condition", "noise_sigma"} <= set(unt_rows.columns)
                                        else [*patient_keys, "phase", "metric"])
    ukeys = patient_keys
    summary = {
        "sparsity": _values(unt_once, ukeys, untreated_phase, "sparsity"),
        "clean": _values(unt_once, ukeys, untreated_phase, "accuracy", "clean"),
        "standard": _values(unt_once, ukeys, untreated_phase, "accuracy", "standard"),
        "combined": _values(unt_once, ukeys, untreated_phase, "accuracy", "combined"),
        "extreme": _values(unt_once, ukeys, untreated_phase, "accuracy", "internal_noise", extreme_sigma),
    }
    unt_mean = pd.Series({k: float(v.mean()) if not v.empty else math.nan for k, v in summary.items()}, name=untreated)
    return DoseTable(table, unt_mean, dose_metric=dose_metric, swept=cols)


def _untreated_for(index: pd.MultiIndex, unt: pd.Series, patient_keys: list[str]) -> np.ndarray:
    """The untreated combined accuracy for each (arm, label, patient) of ``index``."""
    if unt.empty:
        return np.full(len(index), np.nan)
    unt = unt.droplevel("arm")
    same_level = unt.reindex(index.droplevel("arm")).to_numpy(dtype=float)
    by_patient = unt.groupby(level=patient_keys)
    spread = by_patient.max() - by_patient.min()
    if (spread > 1e-9).any():
        if np.isnan(same_level).any():
            raise ValueError(
                "the untreated rows differ between levels (fresh baselines?) and some configurations' levels "
                "have none; run the untreated arm at every level"
            )
        return same_level
    once = by_patient.first()
    pat = index.droplevel(["arm", "label"])
    fallback = once.reindex(pat).to_numpy(dtype=float)
    return np.where(np.isnan(same_level), fallback, same_level)


def _settings(rows: pd.DataFrame, cols: list[str], means: pd.DataFrame, untreated: str) -> tuple[list, list]:
    """The swept parameter(s) set for each configuration and its value (one numeric column) or NaN."""
    treated = rows[rows["arm"] != untreated].drop_duplicates(["arm", "label"]).set_index(["arm", "label"])
    params, settings = [], []
    for arm, label in zip(means["arm"], means["label"], strict=True):
        rec = treated.loc[(arm, label)]
        set_cols = [c for c in cols if not pd.isna(rec[c])]
        params.append(", ".join(set_cols))
        value = rec[set_cols[0]] if len(set_cols) == 1 else math.nan
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        settings.append(float(value) if numeric else math.nan)
    return params, settings


# ---------------------------------------------------------------------------
# Iso-dose matching
# ---------------------------------------------------------------------------


class IsoDoseMatch(ResultsBase):
    """Each arm's configuration nearest each dose target, and the arms ranked there.

    Attributes
    ----------
    rule : {"overlap", "percentiles"}
        How the targets were set: evenly across the overlap of the arms'
        dose ranges, or (no overlap) at percentiles of the pooled doses.
    window : tuple of float
        ``(largest per-arm minimum, smallest per-arm maximum)``; the overlap
        is empty when the first exceeds the second.
    targets : numpy.ndarray
    ranges : pandas.DataFrame
        Per arm: ``arm, dose_min, dose_max, n``.
    matches : pandas.DataFrame
        One row per target and arm: ``target_index, target, arm,
        parameter, setting, label, dose, dose_minus_target`` and the
        configuration's outcomes, then ``rank_combined`` (1 = highest),
        ``rank_relapse`` (1 = smallest drop), ``rank_efficiency`` (1 =
        highest).
    rankings : pandas.DataFrame
        One row per target and ranking: ``target_index, target, ranking,
        order`` (arms best first, ``" > "``-separated).
    """

    def __init__(self, *, rule, window, targets, ranges, matches, rankings, percentiles, n_targets):
        self.rule = rule
        self.window = window
        self.targets = targets
        self.ranges = ranges
        self.matches = matches
        self.rankings = rankings
        self.percentiles = percentiles
        self.n_targets = n_targets

    def summary_frame(self) -> pd.DataFrame:
        """The matches, one row per target and arm (a copy)."""
        return self.matches.copy()

    def summary(self) -> str:
        """Paper-style text: the rule, each target's matches and the rankings."""
        lo, hi = self.window
        if self.rule == "overlap":
            head = (f"Targets: {self.n_targets} evenly spaced across the overlap of the arms' dose ranges "
                    f"[{_sig(lo)}, {_sig(hi)}].")
        else:
            pct = ", ".join(f"{p:g}" for p in self.percentiles)
            head = (f"No dose common to every arm (largest minimum {_sig(lo)} > smallest maximum "
                    f"{_sig(hi)}): targets are the {pct}th percentiles of the pooled doses; "
                    "matches may be far from their targets.")
        cols = ["target", "arm", "label", "dose", "dose_minus_target", "combined", "relapse_drop", "efficiency"]
        frame = self.matches[[c for c in cols if c in self.matches.columns]].copy()
        frame["label"] = [_short(lab) for lab in frame["label"]]
        for c in ("target", "dose", "dose_minus_target"):
            frame[c] = [_sig(v) for v in frame[c]]
        if "efficiency" in frame.columns:
            frame["efficiency"] = [fmt_num(v, 0) for v in frame["efficiency"]]
        ranks = [
            f"target {_sig(t)}: {r} {o}"
            for t, r, o in zip(self.rankings["target"], self.rankings["ranking"], self.rankings["order"], strict=True)
        ]
        return "\n".join(["Iso-dose matching (nearest configuration per arm)", head,
                          frame_to_text(frame.rename(columns={"label": "setting"}), 1), "Rankings:", *ranks])


def iso_dose_match(
    table: DoseTable | pd.DataFrame,
    n_targets: int = 5,
    percentiles: Sequence[float] = (20, 40, 60, 80),
) -> IsoDoseMatch:
    """Match the arms at common dose targets and rank them there (068A facts 8-9).

    1. Pool the doses of every configuration; per arm take its minimum and
       maximum.
    2. The overlap window is ``[largest per-arm minimum, smallest per-arm
       maximum]``.  If it is non-empty (the first does not exceed the second),
       the targets are ``n_targets`` evenly spaced points across it (both ends
       included); otherwise they are the ``percentiles`` of the pooled doses
       (linear interpolation, :func:`numpy.percentile`).
    3. For each target and arm, the match is the configuration whose dose is
       nearest the target (the first in table order on a tie).  No tolerance
       is applied: ``dose_minus_target`` says how far each match is.
    4. At each target the matches are ranked by combined accuracy
       (descending), relapse drop (ascending) and efficiency (descending);
       ties share the better rank.

    Parameters
    ----------
    table : DoseTable or pandas.DataFrame
        From :func:`dose_table` (or its ``.table``), with at least two arms.
    n_targets : int
        Number of targets across a non-empty overlap (at least 1).
    percentiles : sequence of float
        Percentiles (0-100) of the pooled doses used when the overlap is
        empty.

    Returns
    -------
    IsoDoseMatch

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"arm": ["a", "a", "b", "b"], "label": ["1", "2", "1", "2"],
    ...                   "dose": [1.0, 3.0, 2.0, 5.0], "combined": [90.0, 95.0, 97.0, 98.0]})
    >>> m = iso_dose_match(t, n_targets=3)
    >>> m.rule, m.targets.tolist(), m.matches["dose"].tolist()
    ('overlap', [2.0, 2.5, 3.0], [1.0, 2.0, 3.0, 2.0, 3.0, 2.0])
    """
    if isinstance(n_targets, bool) or not isinstance(n_targets, (int, np.integer)) or n_targets < 1:
        raise ValueError(f"n_targets must be a positive int, got {n_targets!r}")
    pct = np.asarray(list(percentiles), dtype=float) if not isinstance(percentiles, str) else np.array([])
    if pct.ndim != 1 or pct.size == 0 or not np.all((pct >= 0) & (pct <= 100)):
        raise ValueError(f"percentiles must be a non-empty sequence of numbers in [0, 100], got {percentiles!r}")
    frame = _as_table(table).reset_index(drop=True)
    arms = list(dict.fromkeys(frame["arm"]))
    if len(arms) < 2:
        raise ValueError(f"matching needs at least two arms with doses, got {arms}")
    doses = frame["dose"].to_numpy(dtype=float)
    ranges = frame.groupby("arm", sort=False)["dose"].agg(dose_min="min", dose_max="max", n="count").reset_index()
    lo, hi = float(ranges["dose_min"].max()), float(ranges["dose_max"].min())
    if lo <= hi:
        rule, targets = "overlap", np.linspace(lo, hi, int(n_targets))
    else:
        rule, targets = "percentiles", np.percentile(doses, pct)

    picks = []
    for i, target in enumerate(targets):
        for arm in arms:
            sub = frame[frame["arm"] == arm]
            j = int(np.argmin(np.abs(sub["dose"].to_numpy(dtype=float) - target)))
            rec = sub.iloc[j].to_dict()
            picks.append({"target_index": i, "target": float(target), **rec,
                          "dose_minus_target": float(rec["dose"]) - float(target)})
    matches = pd.DataFrame(picks)
    lead = ["target_index", "target", "arm", "parameter", "setting", "label", "dose", "dose_minus_target"]
    matches = matches[[c for c in lead if c in matches.columns] + [c for c in matches.columns if c not in lead]]

    rank_rows = []
    for name, col, descending in RANKINGS:
        rank_col = {"combined": "rank_combined", "relapse_drop": "rank_relapse", "efficiency": "rank_efficiency"}[col]
        if col not in matches.columns:
            matches[rank_col] = np.nan
            continue
        matches[rank_col] = matches.groupby("target_index")[col].rank(method="min", ascending=not descending)
        for i, group in matches.groupby("target_index", sort=True):
            ranked = group[np.isfinite(group[col].to_numpy(dtype=float))].sort_values(
                col, ascending=not descending, kind="stable")
            rank_rows.append({"target_index": i, "target": float(targets[i]), "ranking": name,
                              "order": " > ".join(map(str, ranked["arm"]))})
    rankings = pd.DataFrame(rank_rows, columns=["target_index", "target", "ranking", "order"])
    rankings = rankings.sort_values(["target_index"], kind="stable").reset_index(drop=True)
    return IsoDoseMatch(rule=rule, window=(lo, hi), targets=np.asarray(targets, dtype=float), ranges=ranges,
                        matches=matches, rankings=rankings, percentiles=tuple(pct.tolist()), n_targets=int(n_targets))


# ---------------------------------------------------------------------------
# Per-arm summary
# ---------------------------------------------------------------------------


class ArmSweepSummary(ResultsBase):
    """Per arm over its sweep (from :func:`arm_sweep_summary`).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per arm: ``arm, n_configurations, dose_min, dose_max,
        dose_mean, improvement_best, improvement_worst`` (max / min),
        ``relapse_drop_best, relapse_drop_worst`` (min / max: a smaller drop
        is better), ``efficiency_max, efficiency_mean`` and
        ``best_efficiency_setting, best_efficiency_label`` (the configuration
        with the highest efficiency).
    """

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table

    def summary_frame(self) -> pd.DataFrame:
        """The per-arm table (a copy)."""
        return self.table.copy()

    def summary(self) -> str:
        """Paper-style text: one line per arm."""
        frame = self.table.drop(columns=["best_efficiency_label"]).copy()
        for c in ("dose_min", "dose_max", "dose_mean"):
            frame[c] = [_sig(v) for v in frame[c]]
        for c in ("efficiency_max", "efficiency_mean"):
            frame[c] = [fmt_num(v, 0) for v in frame[c]]
        return "\n".join(["Per-arm dose sweep summary", frame_to_text(frame, 2),
                          "Relapse drop: best = smallest; efficiency: improvement / (dose + 1e-8)."])


def arm_sweep_summary(table: DoseTable | pd.DataFrame) -> ArmSweepSummary:
    """Per arm over its sweep: dose range, best and worst outcomes, efficiency (068A fact 10).

    Parameters
    ----------
    table : DoseTable or pandas.DataFrame
        From :func:`dose_table`.

    Returns
    -------
    ArmSweepSummary

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"arm": ["a", "a"], "label": ["x=1", "x=2"], "setting": [1.0, 2.0], "dose": [1.0, 3.0],
    ...                   "improvement": [60.0, 66.0], "relapse_drop": [2.0, 1.0], "efficiency": [60.0, 22.0]})
    >>> arm_sweep_summary(t).table[["n_configurations", "dose_mean", "best_efficiency_setting"]].to_dict("records")
    [{'n_configurations': 2, 'dose_mean': 2.0, 'best_efficiency_setting': 1.0}]
    """
    frame = _as_table(table).copy()
    for c in ("improvement", "relapse_drop", "efficiency", "setting"):
        if c not in frame.columns:
            frame[c] = np.nan
    rows = []
    for arm, g in frame.groupby("arm", sort=False):
        eff = g["efficiency"].to_numpy(dtype=float)
        best = g.iloc[int(np.nanargmax(eff))] if np.isfinite(eff).any() else None
        rows.append({
            "arm": arm,
            "n_configurations": len(g),
            "dose_min": float(g["dose"].min()),
            "dose_max": float(g["dose"].max()),
            "dose_mean": float(g["dose"].mean()),
            "improvement_best": float(g["improvement"].max()),
            "improvement_worst": float(g["improvement"].min()),
            "relapse_drop_best": float(g["relapse_drop"].min()),
            "relapse_drop_worst": float(g["relapse_drop"].max()),
            "efficiency_max": float(np.nanmax(eff)) if best is not None else math.nan,
            "efficiency_mean": float(np.nanmean(eff)) if best is not None else math.nan,
            "best_efficiency_setting": float(best["setting"]) if best is not None else math.nan,
            "best_efficiency_label": str(best["label"]) if best is not None else "",
        })
    return ArmSweepSummary(pd.DataFrame(rows))
