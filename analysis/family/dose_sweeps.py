"""Sheet 068A (dose sweeps): its published numbers and findings, read from a run of
``studies/family/dose_sweeps.toml``.

The study (068A facts 3-7) trains and prunes one baseline, then treats copies of it
with each mechanism at several "doses" of its own parameter: the ketamine-like
regrowth fraction (11 levels), the SSRI-like course length in epochs (11) and the
neurosteroid-like damping (9).  The run is a one-field-at-a-time sweep, so each
row of a treated arm carries its own swept column (``arms.ketamine.regrow_fraction``,
``arms.ssri.epochs``, ``arms.neurosteroid.damping``) and NaN in the others; every
level repeats the untreated rows, identical across levels (shared baseline).

- The **main comparison** (the published table, = study 068) is each arm at its
  published dose, which is also the library's default for that parameter:
  regrowth fraction 0.5, 100 epochs, damping 0.7 (068A fact 2).  The untreated
  network is read once.
- The **sweep headlines** are read over each arm's own levels: per patient, the
  minimum or maximum over the arm's configurations (then averaged over
  patients), or the value at a named level.
- The **findings** are decided on level means (068A published one seed, so its
  numbers are level values) or, for "rises/falls with dose", by the GEE trend
  test of :mod:`analysis.dose_response`, which treats the patient as the
  independent unit (a patient is measured at every level of a shared-baseline
  sweep).

Iso-dose matching, efficiency and the per-arm sweep summary (068A facts 8-10)
are general and live in :mod:`analysis.dose_matching`; :func:`iso_dose` runs
them on a 068A run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.family._sheet import Finding, NotTestable, Quantity, Sheet

__all__ = ["LEVEL", "PUBLISHED_DOSE", "SHEET", "iso_dose", "own_sweep"]

KET, SSRI, NEURO, UNT = "ketamine", "ssri", "neurosteroid", "untreated"
TREATED = (KET, SSRI, NEURO)

#: Each arm's swept column (068A fact 4).
LEVEL = {KET: "arms.ketamine.regrow_fraction", SSRI: "arms.ssri.epochs", NEURO: "arms.neurosteroid.damping"}

#: The dose of the main comparison (068A facts 2-3): the study's default of each swept parameter.
PUBLISHED_DOSE = {KET: 0.5, SSRI: 100.0, NEURO: 0.7}

#: The internal-noise sigma of the "extreme" test (068A fact 5).
EXTREME_SIGMA = 2.5

#: Finding thresholds: ketamine-like combined accuracy at every fraction (068A sweeps: 96.2-97.8 %),
#: the largest |mean relapse drop| that counts as "near zero" (068A: -0.8 to 0.4), and the trend tests' alpha.
KET_FLOOR, NEAR_ZERO, ALPHA = 96.0, 1.0, 0.05


# ---------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------


def own_sweep(results: pd.DataFrame) -> pd.DataFrame:
    """The untreated rows and each treated arm's rows at its own levels (its swept column set).

    With ``regimens = "swept"`` every treated row is at its own level already; with
    ``"all"`` an arm also runs, at its published dose, at the other arms' levels, and
    those repeats are dropped here.  An arm whose swept column is absent keeps all its
    rows (a run without the sweep: the main comparison alone).
    """
    keep = results["arm"] == UNT
    for arm, col in LEVEL.items():
        mine = results["arm"] == arm
        keep |= (mine & results[col].notna()) if col in results.columns else mine
    return results[keep]


def _by_patient(sel: pd.DataFrame, what: str) -> pd.Series:
    """The selected rows' values indexed by patient ((cohort, patient) with several cohorts)."""
    if "cohort" in sel.columns and sel["cohort"].nunique() > 1:
        index = pd.MultiIndex.from_frame(sel[["cohort", "patient"]])
    else:
        index = pd.Index(sel["patient"], name="patient")
    out = pd.Series(sel["value"].to_numpy(dtype=float), index=index, name=what)
    if out.index.has_duplicates:
        raise ValueError(f"several rows per patient for {what}; select one level of the sweep")
    return out


def _pick(rows: pd.DataFrame, phase: str, metric: str, condition: str | None, sigma: float | None) -> pd.DataFrame:
    sel = rows[(rows["phase"] == phase) & (rows["metric"] == metric)]
    if condition is not None:
        sel = sel[sel["condition"] == condition]
    if sigma is not None:
        sel = sel[np.isclose(sel["noise_sigma"].to_numpy(dtype=float), sigma)]
    return sel[np.isfinite(sel["value"].to_numpy(dtype=float))]


def _at_dose(results: pd.DataFrame, arm: str, value: float) -> pd.DataFrame:
    """An arm's rows at one value of its swept column (all its rows when the column is absent)."""
    rows = results[results["arm"] == arm]
    col = LEVEL[arm]
    if col not in rows.columns:
        return rows
    return rows[np.isclose(rows[col].to_numpy(dtype=float), value)]


def _untreated_once(results: pd.DataFrame) -> pd.DataFrame:
    """The untreated rows of one level (every level of the shared-baseline sweep repeats them)."""
    rows = results[results["arm"] == UNT]
    keys = [c for c in ("cohort", "patient", "phase", "metric", "condition", "noise_sigma") if c in rows.columns]
    return rows.drop_duplicates(keys)


def _main(
    phase: str, metric: str, condition: str | None = None, sigma: float | None = None, untreated: str | None = None
) -> Callable[[pd.DataFrame, str], pd.Series]:
    """Per patient: ``metric`` of an arm at its published dose (the untreated's from phase ``untreated``)."""

    def read(results: pd.DataFrame, arm: str) -> pd.Series:
        if arm == UNT:
            if untreated is None:
                return pd.Series(dtype=float)
            return _by_patient(_pick(_untreated_once(results), untreated, metric, condition, sigma), metric)
        if arm not in PUBLISHED_DOSE:
            return pd.Series(dtype=float)
        rows = _at_dose(results, arm, PUBLISHED_DOSE[arm])
        return _by_patient(_pick(rows, phase, metric, condition, sigma), metric)

    return read


def _over_sweep(
    how: str, phase: str, metric: str, condition: str | None = None
) -> Callable[[pd.DataFrame, str], pd.Series]:
    """Per patient: the minimum or maximum of ``metric`` over the arm's own configurations."""

    def read(results: pd.DataFrame, arm: str) -> pd.Series:
        col = LEVEL.get(arm)
        if col is None or col not in results.columns:
            return pd.Series(dtype=float)
        rows = results[(results["arm"] == arm) & results[col].notna()]
        sel = _pick(rows, phase, metric, condition, None)
        if sel.empty:
            return pd.Series(dtype=float)
        keys = ["cohort", "patient"] if "cohort" in sel.columns and sel["cohort"].nunique() > 1 else ["patient"]
        out = sel.groupby(keys)["value"].agg(how).astype(float)
        return out.rename(f"{metric} {how}")

    return read


def _at_level(
    only: str, value: float, phase: str, metric: str, condition: str | None = None
) -> Callable[[pd.DataFrame, str], pd.Series]:
    """Per patient: ``metric`` of arm ``only`` at one level of its sweep (empty for other arms)."""

    def read(results: pd.DataFrame, arm: str) -> pd.Series:
        if arm != only or LEVEL[arm] not in results.columns:
            return pd.Series(dtype=float)
        return _by_patient(_pick(_at_dose(results, arm, value), phase, metric, condition, None), metric)

    return read


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------


def _level_means(results: pd.DataFrame, arm: str, phase: str, metric: str, condition: str | None = None) -> pd.Series:
    """Mean over patients per level of the arm's own sweep; NotTestable with fewer than 2 levels."""
    col = LEVEL[arm]
    if col not in results.columns:
        raise NotTestable(f"no {col} column: the run is not the 068A dose sweep")
    rows = results[(results["arm"] == arm) & results[col].notna()]
    sel = _pick(rows, phase, metric, condition, None)
    means = sel.groupby(col)["value"].mean()
    if len(means) < 2:
        raise NotTestable(f"{arm}: {phase} {metric} at {len(means)} level(s) of {col}; needs at least 2")
    return means


def _ket_combined_high(results: pd.DataFrame) -> tuple[bool, str]:
    means = _level_means(results, KET, "acute", "accuracy", "combined")
    low = means.idxmin()
    return bool((means >= KET_FLOOR).all()), (
        f"mean combined {means.min():.1f}-{means.max():.1f}% over {len(means)} fractions "
        f"(lowest at {low:g}); threshold {KET_FLOOR:g}%"
    )


def _ket_relapse_flat(results: pd.DataFrame) -> tuple[bool, str]:
    means = _level_means(results, KET, "sweep_relapse", "relapse_drop")
    worst = means.abs().idxmax()
    return bool((means.abs() <= NEAR_ZERO).all()), (
        f"mean drop {means.min():.2f} to {means.max():.2f} points over {len(means)} fractions "
        f"(largest |drop| at {worst:g}); bound +-{NEAR_ZERO:g}"
    )


def _trend(
    results: pd.DataFrame, arm: str, phase: str, alternative: str, what: str
) -> tuple[bool, str]:
    from analysis.dose_response import trend_test

    col = LEVEL[arm]
    if col not in results.columns:
        raise NotTestable(f"no {col} column: the run is not the 068A dose sweep")
    rows = results[(results["arm"] == arm) & results[col].notna()]
    sel = _pick(rows, phase, "accuracy", "combined", None)
    n_lev, n_pat = sel[col].nunique(), sel["patient"].nunique()
    if n_lev < 3 or n_pat < 2:
        raise NotTestable(
            f"{arm}: {what} at {n_lev} level(s) of {col} for {n_pat} patient(s); the trend test needs "
            "at least 3 levels and 2 patients (the published single seed cannot be tested this way)"
        )
    res = trend_test(sel, col, "accuracy", "combined", phase, arm, alternative=alternative)
    row = res.table.iloc[0]
    means = sel.groupby(col)["value"].mean()
    sign_ok = row["slope"] > 0 if alternative == "increasing" else row["slope"] < 0
    holds = bool(sign_ok and row["pvalue"] < ALPHA)
    p = row["pvalue"]
    ptxt = "<0.001" if p < 0.001 else f"{p:.3f}"
    return holds, (
        f"{what} {means.iloc[0]:.1f}% at {means.index[0]:g} -> {means.iloc[-1]:.1f}% at {means.index[-1]:g}; "
        f"GEE slope {row['slope']:.3g} per unit, one-sided p {ptxt} (n = {n_pat}, {n_lev} levels)"
    )


def _ssri_rises(results: pd.DataFrame) -> tuple[bool, str]:
    return _trend(results, SSRI, "acute", "increasing", "combined")


def _neuro_off_falls(results: pd.DataFrame) -> tuple[bool, str]:
    return _trend(results, NEURO, "off_medication", "decreasing", "off-medication combined")


def _ssri_dose_below(results: pd.DataFrame) -> tuple[bool, str]:
    from analysis.dose_matching import iso_dose_match

    table = _dose_table(results)
    ranges = table.groupby("arm")["dose"].agg(["min", "max"])
    missing = [a for a in TREATED if a not in ranges.index]
    if missing:
        raise NotTestable(f"no dose rows for {missing}")
    below = all(ranges.loc[SSRI, "max"] < ranges.loc[a, "min"] for a in (KET, NEURO))
    rule = iso_dose_match(table[table["arm"].isin(TREATED)]).rule
    text = "; ".join(f"{a} {ranges.loc[a, 'min']:.2g}-{ranges.loc[a, 'max']:.2g}" for a in TREATED)
    return below, f"mean L1 ranges: {text}; matching rule: {rule}"


def _swept(results: pd.DataFrame) -> list[str]:
    return [c for c in LEVEL.values() if c in results.columns]


def _dose_table(results: pd.DataFrame) -> pd.DataFrame:
    from analysis.dose_matching import dose_table

    try:
        return dose_table(own_sweep(results), "dose_l1", swept=_swept(results)).table
    except ValueError as exc:
        raise NotTestable(str(exc)) from None


def iso_dose(results: pd.DataFrame):
    """068A facts 8-10 on a run: ``(dose table, iso-dose matches, per-arm sweep summary)``.

    Each treated arm is read at its own levels only (:func:`own_sweep`); the dose is L1.
    """
    from analysis.dose_matching import arm_sweep_summary, dose_table, iso_dose_match

    table = dose_table(own_sweep(results), "dose_l1", swept=_swept(results))
    return table, iso_dose_match(table), arm_sweep_summary(table)


# ---------------------------------------------------------------------------
# The sheet
# ---------------------------------------------------------------------------

_MAIN = (
    Quantity("sparsity %", _main("acute", "sparsity", untreated="pruned")),
    Quantity("clean %", _main("acute", "accuracy", "clean", untreated="pruned")),
    Quantity("standard %", _main("acute", "accuracy", "standard", untreated="pruned")),
    Quantity("combined %", _main("acute", "accuracy", "combined", untreated="pruned")),
    Quantity("internal sigma 2.5 %", _main("acute", "accuracy", "internal_noise", EXTREME_SIGMA, untreated="pruned")),
    Quantity("acute relapse drop (points)", _main("acute_relapse", "relapse_drop")),
    Quantity("off-medication combined %", _main("off_medication", "accuracy", "combined")),
    Quantity("off-medication sigma 2.5 %", _main("off_medication", "accuracy", "internal_noise", EXTREME_SIGMA)),
)

_SWEEP = (
    Quantity("sweep combined min %", _over_sweep("min", "acute", "accuracy", "combined")),
    Quantity("sweep combined max %", _over_sweep("max", "acute", "accuracy", "combined")),
    Quantity("sweep L1 dose min", _over_sweep("min", "dose", "dose_l1"), decimals=4),
    Quantity("sweep L1 dose max", _over_sweep("max", "dose", "dose_l1"), decimals=4),
    Quantity("sweep relapse drop min (points)", _over_sweep("min", "sweep_relapse", "relapse_drop")),
    Quantity("sweep relapse drop max (points)", _over_sweep("max", "sweep_relapse", "relapse_drop")),
    Quantity("combined % at 10 epochs", _at_level(SSRI, 10.0, "acute", "accuracy", "combined")),
    Quantity("combined % at 200 epochs", _at_level(SSRI, 200.0, "acute", "accuracy", "combined")),
    Quantity("off-medication combined % at damping 0.50",
             _at_level(NEURO, 0.5, "off_medication", "accuracy", "combined")),
    Quantity("off-medication combined % at damping 0.90",
             _at_level(NEURO, 0.9, "off_medication", "accuracy", "combined")),
)


def _published() -> dict[tuple[str, str], tuple[float, float | None]]:
    arms = (UNT, KET, SSRI, NEURO)
    main = {
        "sparsity %": (95.0, 47.5, 95.0, 95.0),
        "clean %": (50.8, 100.0, 100.0, 100.0),
        "standard %": (43.9, 100.0, 99.5, 100.0),
        "combined %": (31.8, 96.9, 83.5, 97.5),
        "internal sigma 2.5 %": (28.3, 84.5, 44.0, 42.5),
        "acute relapse drop (points)": (None, -0.2, 10.8, 4.1),
        "off-medication combined %": (None, None, None, 90.5),
        "off-medication sigma 2.5 %": (None, None, None, 58.6),
        "sweep combined min %": (None, 96.2, None, 97.2),
        "sweep combined max %": (None, 97.8, None, 98.0),
        "sweep L1 dose min": (None, 0.0025, 0.0001, 0.0021),
        "sweep L1 dose max": (None, 0.0206, 0.0016, 0.0034),
        "sweep relapse drop min (points)": (None, -0.8, 1.6, None),
        "sweep relapse drop max (points)": (None, 0.4, 10.5, None),
        "combined % at 10 epochs": (None, None, 37.5, None),
        "combined % at 200 epochs": (None, None, 95.5, None),
        "off-medication combined % at damping 0.50": (None, None, None, 93.9),
        "off-medication combined % at damping 0.90": (None, None, None, 83.8),
    }
    return {(q, a): (float(v), None) for q, values in main.items() for a, v in zip(arms, values, strict=True)
            if v is not None}


SHEET = Sheet(
    id="068A",
    title="Dose sweeps: do the three mechanisms differ at equal dose of weight change?",
    source=(
        "068A_antidep_modes_v2.ipynb (cheungngo/Divergent-Mechanisms-of-Antidepressant-Efficacy); "
        "the main comparison is study 068 (= Ch04); one run, seed 42"
    ),
    n_published=1,
    arms=(UNT, KET, SSRI, NEURO),
    quantities=_MAIN + _SWEEP,
    published=_published(),
    findings=(
        Finding(
            "068A-1",
            "However little or much of the pruned network the ketamine-like arm regrows (5-80 %), its "
            "combined-stress accuracy stays high.",
            f"mean acute combined accuracy >= {KET_FLOOR:g} % at every regrowth fraction (at least 2 fractions)",
            _ket_combined_high,
        ),
        Finding(
            "068A-2",
            "The SSRI-like arm's combined-stress accuracy grows with the length of its course.",
            f"GEE slope of acute combined accuracy on epochs (exchangeable, clustered by patient) > 0, one-sided "
            f"p < {ALPHA:g} (t on patients - 1 df; at least 3 course lengths and 2 patients)",
            _ssri_rises,
        ),
        Finding(
            "068A-3",
            "Taken off medication, the neurosteroid-like network keeps less of its combined-stress accuracy the "
            "weaker the damping it was treated with.",
            f"GEE slope of off-medication combined accuracy on damping (exchangeable, clustered by patient) < 0, "
            f"one-sided p < {ALPHA:g} (at least 3 damping values and 2 patients)",
            _neuro_off_falls,
        ),
        Finding(
            "068A-4",
            "The SSRI-like courses change the weights less than any ketamine-like or neurosteroid-like "
            "configuration, so no dose is shared by all three arms and iso-dose matching falls back to "
            "percentiles of the pooled doses.",
            "largest mean L1 dose over SSRI-like configurations < smallest over ketamine-like and < smallest "
            "over neurosteroid-like configurations (then the overlap window is empty)",
            _ssri_dose_below,
        ),
        Finding(
            "068A-5",
            "Removing 40 % of the live weights costs the ketamine-like network almost nothing at any regrowth "
            "fraction.",
            f"|mean sweep-relapse drop in combined accuracy| <= {NEAR_ZERO:g} point at every regrowth fraction "
            "(at least 2 fractions)",
            _ket_relapse_flat,
        ),
    ),
    notes=(
        "One run with seed 42: the sheet prints no SD, so the comparison is against a single value.",
        "Main comparison: each arm at its published dose (regrowth fraction 0.5, 100 SSRI-like epochs, "
        "damping 0.7, the study's defaults); the untreated network once (every level repeats it).",
        "Sweep min/max: per patient over the arm's own configurations, then averaged over patients.",
        "The sweep's relapse removes 40 % of each layer's live weights (no cap); the acute relapse is the "
        "main comparison's capped re-prune.",
        "In the published run no L1 dose is common to all three arms; the iso-dose targets were percentiles "
        "of the pooled doses, so the matched configurations are not at equal dose "
        "(analysis.dose_matching, docs/dose-response.md).",
    ),
)
