"""Readers that turn the tidy results into one value per patient, for the sheets' quantities.

A reader is ``(results, arm) -> pandas.Series`` indexed by patient, empty where the run has no
such rows for the arm (see :class:`analysis.family.Quantity`). They accept the table as
``results.csv`` reads it (empty ``condition`` as NaN) as well as the normalised one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from analysis._data import assessment_phase

Reader = Callable[[pd.DataFrame, str], pd.Series]

#: The arms of the family's 10-seed studies, in the sheets' column order.
UNT, KET, SSRI, NEURO = "untreated", "ketamine", "ssri", "neurosteroid"
ARMS = (UNT, KET, SSRI, NEURO)
TREATED = (KET, SSRI, NEURO)


def empty() -> pd.Series:
    """The reader's answer where the arm has no value: an empty float Series indexed by patient."""
    return pd.Series(dtype=float, index=pd.Index([], name="patient", dtype=int), name="value")


def pick(
    results: pd.DataFrame,
    arm: str,
    phase: str,
    metric: str,
    condition: str = "",
    sigma: float | None = None,
    cycle: int | None = None,
) -> pd.DataFrame:
    """Rows of ``arm`` at ``phase`` with ``metric`` and ``condition`` (and ``noise_sigma``, ``cycle``)."""
    cond = results["condition"].fillna("").astype(str)
    mask = (results["arm"] == arm) & (results["phase"] == phase) & (results["metric"] == metric) & (cond == condition)
    if sigma is not None:
        mask &= np.isclose(results["noise_sigma"].to_numpy(dtype=float), sigma)
    if cycle is not None:
        if "cycle" not in results:
            return results.iloc[:0]
        mask &= results["cycle"] == cycle
    return results.loc[mask]


def patient_means(rows: pd.DataFrame) -> pd.Series:
    """One value per patient (the mean of its rows), indexed by patient."""
    if rows.empty:
        return empty()
    return rows.groupby("patient", sort=True)["value"].mean().astype(float)


def acute(metric: str, condition: str = "", sigma: float | None = None, arms: Iterable[str] | None = None) -> Reader:
    """The acute assessment of an arm (the pruned one, phase ``pruned``, for ``untreated``)."""
    return at(None, metric, condition, sigma, arms=arms)


def at(
    phase: str | None,
    metric: str,
    condition: str = "",
    sigma: float | None = None,
    cycle: int | None = None,
    arms: Iterable[str] | None = None,
    scale: float = 1.0,
) -> Reader:
    """A reader of ``metric`` at ``phase`` (``None``: the arm's assessment phase), times ``scale``,
    restricted to ``arms`` when given."""
    only = None if arms is None else frozenset(arms)

    def read(results: pd.DataFrame, arm: str) -> pd.Series:
        if only is not None and arm not in only:
            return empty()
        where = assessment_phase(arm) if phase is None else phase
        return patient_means(pick(results, arm, where, metric, condition, sigma, cycle)) * scale

    return read


def by_cycle(results: pd.DataFrame, arm: str, phase: str, metric: str, condition: str, cycles: range,
             label_prefix: str | None = None) -> pd.DataFrame:
    """Patients x cycles of ``metric`` at ``phase`` (mean per cell), only patients with every cycle
    in ``cycles``; rows restricted to labels starting with ``label_prefix`` where the table has labels."""
    rows = pick(results, arm, phase, metric, condition)
    if "cycle" not in rows:
        return pd.DataFrame(columns=list(cycles), dtype=float)
    if label_prefix is not None and "label" in rows:
        rows = rows[rows["label"].astype(str).str.startswith(label_prefix)]
    rows = rows[rows["cycle"].isin(list(cycles))]
    wide = rows.pivot_table(index="patient", columns="cycle", values="value", aggfunc="mean")
    wide = wide.reindex(columns=list(cycles)).dropna()
    wide.columns = [int(c) for c in wide.columns]
    return wide.astype(float)


#: Readers shared by the sheets: acute accuracies (the pruned ones for untreated) and the
#: neurosteroid-like off-medication tests (damping 1, ReLU).
COMBINED = acute("accuracy", "combined")
BIASED = acute("accuracy", "biased")
SIGMA_25 = acute("accuracy", "internal_noise", 2.5)
OFF_COMBINED = at("off_medication", "accuracy", "combined", arms=(NEURO,))
OFF_BIASED = at("off_medication", "accuracy", "biased", arms=(NEURO,))
OFF_SIGMA_25 = at("off_medication", "accuracy", "internal_noise", 2.5, arms=(NEURO,))
