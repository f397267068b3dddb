"""analysis.trajectories: per-arm means over trial time with t intervals, from any schedule's rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.trajectories import trajectory


def _rows(values, times, arm="a", patients=None, metric="accuracy", condition="combined", **extra):
    n = len(values)
    return pd.DataFrame({"patient": patients if patients is not None else list(range(n)), "arm": arm,
                         "phase": "chronic", "metric": metric, "condition": condition, "noise_sigma": math.nan,
                         "maintenance_epochs": math.nan, "step": math.nan, "value": values, "time": times,
                         "cycle": extra.get("cycle", [0] * n), "label": "chronic"})


def test_mean_sd_and_t_interval_per_arm_and_time():
    """Per arm and time: n patients, their mean, SD (ddof 1) and the 95 % t interval of the mean."""
    rng = np.random.default_rng(7)
    x = rng.normal(80, 5, size=6)
    df = pd.concat([_rows(list(x), [3.0] * 6), _rows([50.0, 60.0], [0.0, 0.0], arm="b")])
    out = trajectory(df, "accuracy", "combined")
    a = out[out.arm == "a"].iloc[0]
    half = stats.t.ppf(0.975, 5) * x.std(ddof=1) / math.sqrt(6)
    assert a.n == 6 and a.time == 3.0
    np.testing.assert_allclose([a["mean"], a.sd, a.ci_low, a.ci_high],
                               [x.mean(), x.std(ddof=1), x.mean() - half, x.mean() + half], rtol=1e-12)
    assert out[out.arm == "b"].iloc[0]["mean"] == 55.0


def test_a_patient_counts_once_per_point():
    """Two rows of one patient at one time (e.g. two maintenance durations) are averaged first: n = 1."""
    df = _rows([60.0, 80.0], [5.0, 5.0], patients=[0, 0])
    out = trajectory(df, "accuracy", "combined")
    assert out.n.tolist() == [1] and out["mean"].tolist() == [70.0] and math.isnan(out.ci_low.iloc[0])


def test_bad_arguments():
    """An unknown axis and a table without the schedule columns are refused with a clear message."""
    df = _rows([1.0], [0.0])
    with pytest.raises(ValueError, match="by must be"):
        trajectory(df, "accuracy", "combined", by="epoch")
    with pytest.raises(ValueError, match="schedule column"):
        trajectory(df.drop(columns=["time", "cycle"]), "accuracy", "combined")
