"""Shared helpers: validating the tidy results table and naming arms.

Everything here is private to :mod:`analysis`; the public functions of the
other modules call :func:`check_results` on their input so that every entry
point reports a malformed table the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from virtualpatient.protocol import AssessmentConfig, LongitudinalConfig
from virtualpatient.schema import COLUMNS

#: Columns every results table must have (see ``docs/results-schema.md``).
REQUIRED_COLUMNS: tuple[str, ...] = tuple(COLUMNS)

#: How the paper names the arms of the study.
ARM_DISPLAY_NAMES: dict[str, str] = {
    "untreated": "Untreated (pruned)",
    "ketamine": "Ketamine-like",
    "ssri": "SSRI-like",
    "neurosteroid": "Neurosteroid-like",
}

UNTREATED = "untreated"

#: Default relapse threshold (percent biased-noise accuracy) of the paper.
DEFAULT_RELAPSE_THRESHOLD = LongitudinalConfig().relapse_threshold

#: The paper's "extreme" internal-noise level (Table 2's last column, the off-medication test).
EXTREME_SIGMA = max(AssessmentConfig().resilience_sigmas)


def display_name(arm: str) -> str:
    """Return the paper's name of ``arm`` (unknown arms display by their name)."""
    return ARM_DISPLAY_NAMES.get(arm, str(arm))


def require_columns(frame: object, columns: Iterable[str], name: str, *, expected: str = "a pandas DataFrame",
                    kind: str = "", note: str = "") -> pd.DataFrame:
    """Return ``frame`` when it is a DataFrame holding every one of ``columns``.

    Raises
    ------
    TypeError
        ``"{name} must be {expected}, got <type>"``.
    ValueError
        ``"{name} is missing {kind}column(s) [...]{note}"``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be {expected}, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing {kind}column(s) {missing}{note}")
    return frame


def check_results(results: object, *, name: str = "results") -> pd.DataFrame:
    """Validate a results table and return a normalised copy.

    The copy has ``condition`` as strings with ``""`` for "no condition" (a
    CSV round trip turns the empty strings of the schema into NaN), ``arm``,
    ``phase`` and ``metric`` as strings, and the numeric columns as float.

    Raises
    ------
    TypeError
        If ``results`` is not a :class:`pandas.DataFrame`.
    ValueError
        If a required column is missing or ``value`` is not numeric.
    """
    require_columns(results, REQUIRED_COLUMNS, name, expected="a pandas DataFrame in the tidy results schema",
                    kind="required ", note="; see docs/results-schema.md for the schema")
    df = results.copy()
    for col in ("arm", "phase", "metric"):
        df[col] = df[col].astype(str)
    cond = df["condition"]
    df["condition"] = cond.where(cond.notna(), "").astype(str)
    for col in ("noise_sigma", "maintenance_epochs", "step", "value"):
        try:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} column {col!r} must be numeric: {exc}") from None
    try:
        df["patient"] = pd.to_numeric(df["patient"], errors="raise").astype(int)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} column 'patient' must be integer: {exc}") from None
    return df


def arm_order(results: pd.DataFrame, arms: Iterable[str] | None = None) -> list[str]:
    """Arms in paper order: ``untreated`` first, then in order of appearance.

    If ``arms`` is given it is validated against the table and returned in
    that order.
    """
    present = [str(a) for a in pd.unique(results["arm"])]
    if arms is not None:
        if isinstance(arms, str):
            raise TypeError("arms must be a sequence of arm names, not a single string")
        wanted = [str(a) for a in arms]
        unknown = [a for a in wanted if a not in present]
        if unknown:
            raise ValueError(f"arm(s) {unknown} not in results; present: {present}")
        return wanted
    ordered = [UNTREATED] if UNTREATED in present else []
    ordered += [a for a in present if a != UNTREATED]
    return ordered


def assessment_phase(arm: str) -> str:
    """Phase holding an arm's main assessments (``pruned`` for untreated)."""
    return "pruned" if arm == UNTREATED else "acute"


def select(
    results: pd.DataFrame,
    *,
    arm: str | None = None,
    phase: str | None = None,
    metric: str | None = None,
    condition: str | None = None,
    noise_sigma: float | None = None,
) -> pd.DataFrame:
    """Rows of a normalised results table matching every given field."""
    mask = np.ones(len(results), dtype=bool)
    if arm is not None:
        mask &= (results["arm"] == arm).to_numpy()
    if phase is not None:
        mask &= (results["phase"] == phase).to_numpy()
    if metric is not None:
        mask &= (results["metric"] == metric).to_numpy()
    if condition is not None:
        mask &= (results["condition"] == condition).to_numpy()
    if noise_sigma is not None:
        mask &= np.isclose(results["noise_sigma"].to_numpy(), float(noise_sigma))
    return results.loc[mask]


def per_patient(rows: pd.DataFrame) -> pd.Series:
    """One value per patient (mean over any duplicate rows), indexed by patient."""
    return rows.groupby("patient", sort=True)["value"].mean()


def relapse_threshold(protocol: Mapping | None) -> float:
    """The relapse threshold (percent) from a protocol dict, else the paper's 60."""
    if protocol is None:
        return DEFAULT_RELAPSE_THRESHOLD
    if not isinstance(protocol, Mapping):
        raise TypeError(f"protocol must be a dict or None, got {type(protocol).__name__}")
    longitudinal = protocol.get("longitudinal")
    if isinstance(longitudinal, Mapping) and longitudinal.get("relapse_threshold") is not None:
        return float(longitudinal["relapse_threshold"])
    return DEFAULT_RELAPSE_THRESHOLD


def decay_rate(protocol: Mapping | None, arm: str) -> float:
    """An arm's wash-out decay rate per step from a protocol dict, else NaN."""
    if protocol is None:
        return float("nan")
    if not isinstance(protocol, Mapping):
        raise TypeError(f"protocol must be a dict or None, got {type(protocol).__name__}")
    arms = protocol.get("arms")
    if isinstance(arms, Mapping) and isinstance(arms.get(arm), Mapping):
        value = arms[arm].get("washout_decay")
        if value is not None:
            return float(value)
    return float("nan")


@dataclass(frozen=True)
class TableColumn:
    """One column of a paper table and where its numbers come from.

    It and :func:`cell_values` (the rule that reads one cell's per-patient values) live here, with
    the rest of the results vocabulary, so the general statistics (:mod:`analysis.stats`) select
    cells by the same rule as the paper's tables without importing :mod:`analysis.tables`.

    Attributes
    ----------
    label : str
        The paper's column header.
    metric : str
        Results ``metric``; ``relapse_probability`` and ``decay_rate`` are
        derived (from ``relapsed`` rows and from the protocol).
    condition : str
        Results ``condition`` (``""`` for none).
    noise_sigma : float or None
        Internal-noise SD for ``internal_noise`` accuracies.
    phase : str or None
        Results ``phase``; ``None`` means the arm's assessment phase
        (``pruned`` for untreated, ``acute`` otherwise).
    decimals : int
        Decimals the paper prints.
    """

    label: str
    metric: str
    condition: str = ""
    noise_sigma: float | None = None
    phase: str | None = None
    decimals: int = 1

    def phase_for(self, arm: str) -> str:
        """The results phase holding this column's numbers for ``arm``."""
        return self.phase if self.phase is not None else assessment_phase(arm)


def cell_values(
    df: pd.DataFrame, column: TableColumn, arm: str, protocol: Mapping | None = None
) -> pd.Series:
    """Per-patient values of one table cell (empty if the run has none).

    ``df`` must already be normalised by ``check_results``.  A patient's
    relapse probability is 100 x the mean of its ``relapsed`` rows over the
    maintenance durations; the decay rate is the protocol's constant; other
    wash-out metrics are taken at the last step; rows repeated over
    maintenance durations are averaged per patient.
    """
    if column.metric == "relapse_probability":
        rows = select(df, arm=arm, phase="washout", metric="relapsed")
        return 100.0 * per_patient(rows)
    if column.metric == "decay_rate":
        rate = decay_rate(protocol, arm)
        patients = np.sort(df.loc[df["arm"] == arm, "patient"].unique())
        if math.isnan(rate) or arm == UNTREATED:
            return pd.Series(dtype=float, index=pd.Index([], name="patient"))
        return pd.Series(rate, index=pd.Index(patients, name="patient"), dtype=float)
    rows = select(
        df,
        arm=arm,
        phase=column.phase_for(arm),
        metric=column.metric,
        condition=column.condition,
        noise_sigma=column.noise_sigma,
    )
    if rows["step"].notna().any():
        # wash-out trajectories: the value after the last decay step
        rows = rows[rows["step"] == rows["step"].max()]
    return per_patient(rows)
