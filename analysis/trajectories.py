"""Per-arm trajectories of any metric over trial time (or cycles), for any schedule.

A schedule's rows carry the trial clock (``time``: training epochs since the lesion) and the cycle
of the innermost repeat (``cycle``), see ``docs/results-schema.md``. :func:`trajectory` averages a
metric per patient at each point, then across patients per arm, with a Student-t confidence
interval, so a schedule the paper never had (repeated episodes, sequences, tapers) can be plotted
without code of its own.

Examples
--------
>>> import pandas as pd
>>> rows = pd.DataFrame({"patient": [0, 1, 0, 1], "arm": "a", "phase": "chronic", "metric": "accuracy",
...                      "condition": "combined", "noise_sigma": float("nan"), "maintenance_epochs": float("nan"),
...                      "step": float("nan"), "value": [80.0, 90.0, 70.0, 90.0], "time": [0.0, 0.0, 5.0, 5.0],
...                      "cycle": [0, 0, 1, 1]})
>>> trajectory(rows, "accuracy", "combined", by="cycle")[["arm", "cycle", "n", "mean"]]
  arm  cycle  n  mean
0   a      0  2  85.0
1   a      1  2  80.0
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis._data import check_results, require_columns
from analysis.summaries import t_ci

__all__ = ["trajectory"]


def trajectory(results: pd.DataFrame, metric: str, condition: str = "", *, by: str = "time",
               phase: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Mean, SD and confidence interval of ``metric`` per arm at each ``time`` or ``cycle``.

    Parameters
    ----------
    results
        A results table with the schedule columns (``time``, ``cycle``, ``label``).
    metric, condition
        Which rows (``condition`` ``""`` for metrics without one).
    by
        ``"time"`` (trial clock) or ``"cycle"``.
    phase
        Only rows of this phase label (default: all).
    confidence
        Level of the t interval of the mean (population spread, ``ddof = 1``).

    Returns
    -------
    pandas.DataFrame
        One row per arm and point: ``arm``, ``by``, ``n`` (patients), ``mean``, ``sd``,
        ``ci_low``, ``ci_high``. A patient with several rows at a point (e.g. one per maintenance
        duration) counts once, with their mean.

    Raises
    ------
    ValueError
        For an unknown ``by`` or a table without the schedule columns.
    """
    if by not in ("time", "cycle"):
        raise ValueError(f"by must be 'time' or 'cycle', got {by!r}")
    df = check_results(results)
    require_columns(df, ("time", "cycle"), "results", kind="schedule ",
                    note="; tables written before schedules (docs/schedules.md) have no trial clock")
    rows = df[(df.metric == metric) & (df.condition == condition)]
    if phase is not None:
        rows = rows[rows.phase == phase]
    per_patient = rows.groupby(["arm", by, "patient"], sort=True).value.mean().reset_index()
    out = []
    for (arm, point), g in per_patient.groupby(["arm", by], sort=True):
        x = g.value.to_numpy(dtype=float)
        lo, hi = t_ci(x, confidence)
        out.append({"arm": arm, by: point, "n": int(x.size), "mean": float(x.mean()),
                    "sd": float(x.std(ddof=1)) if x.size > 1 else np.nan, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(out, columns=["arm", by, "n", "mean", "sd", "ci_low", "ci_high"])
