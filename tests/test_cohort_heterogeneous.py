"""Heterogeneous cohorts: per-patient covariates drawn reproducibly, recorded, and acted upon."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from virtualpatient import ClinicalTrial, Cohort, CohortConfig, Distribution, Protocol, ProtocolError, load_study
from virtualpatient.cohort import COVARIATES

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "heterogeneous.toml"


def _tiny_heterogeneous(n_patients: int = 4) -> Protocol:
    """studies/heterogeneous.toml with its cohort and arms, on a small network and short schedule."""
    data = tomllib.loads(STUDY.read_text())
    data.update(
        n_patients=n_patients,
        network={"layer_sizes": [2, 64, 64, 32, 4]},  # 6,400 weights: rounding of per-layer quotas < 0.1 pp
        task={"n_train": 256, "n_standard": 128, "n_clean": 32},
        baseline={"epochs": 3},
        longitudinal={"durations": [1, 2], "washout_steps": 3},
    )
    data["arms"]["ketamine"].update(epochs=1, score_batches=2)
    data["arms"]["ssri"]["epochs"] = 2
    data["arms"]["neurosteroid"]["epochs"] = 1
    return Protocol.from_dict(data, source="tiny heterogeneous")


@pytest.fixture(scope="module")
def results():
    protocol = _tiny_heterogeneous()
    trial = ClinicalTrial(protocol, progress=False)
    return trial, trial.run()


def test_heterogeneous_study_loads():
    """studies/heterogeneous.toml is valid: the paper's protocol with pruning depth uniform on
    [0.85, 0.98], lr_scale a truncated normal and regrowth_fraction a choice; every patient's draws
    lie in range."""
    p = load_study(STUDY)
    assert p.n_patients == 20 and set(p.arms) == {"ketamine", "ssri", "neurosteroid"}
    assert p.cohort.prune_fraction == Distribution(kind="uniform", low=0.85, high=0.98)
    assert p.cohort.lr_scale == Distribution(kind="normal", mean=1.0, sd=0.2, low=0.5, high=1.5)
    assert p.cohort.regrowth_fraction == Distribution(kind="choice", values=(0.3, 0.5, 0.7))
    assert p.pruning.fraction == 0.95 and p.longitudinal.durations == (25, 50, 100, 150, 200, 300)
    cohort = ClinicalTrial(p, progress=False).cohort
    pf = np.array([s.covariates["prune_fraction"] for s in cohort])
    lr = np.array([s.covariates["lr_scale"] for s in cohort])
    assert ((0.85 <= pf) & (pf <= 0.98)).all() and pf.std() > 0.02
    assert ((0.5 <= lr) & (lr <= 1.5)).all() and lr.std() > 0.05
    assert {s.covariates["regrowth_fraction"] for s in cohort} <= {0.3, 0.5, 0.7}
    assert Protocol.from_dict(p.to_dict()).hash() == p.hash()  # the manifest's copy reloads to the same run


def test_draws_reproducible_and_independent_of_cohort_size():
    """Covariates come from each patient's own stream: the same seed gives the same values, patient k's
    values do not depend on the cohort size, and another seed gives other values."""
    config = load_study(STUDY).cohort
    defaults = {"prune_fraction": 0.95, "regrowth_fraction": math.nan, "lr_scale": 1.0}
    small = Cohort.from_config(config, 2, seed=7, defaults=defaults)
    large = Cohort.from_config(config, 5, seed=7, defaults=defaults)
    again = Cohort.from_config(config, 5, seed=7, defaults=defaults)
    other = Cohort.from_config(config, 5, seed=8, defaults=defaults)
    assert [s.covariates for s in small] == [s.covariates for s in large[:2]]
    assert [s.covariates for s in large] == [s.covariates for s in again]
    assert [s.covariates["prune_fraction"] for s in large] != [s.covariates["prune_fraction"] for s in other]
    # the covariates are drawn from independent streams: changing one distribution leaves the others
    narrower = CohortConfig(prune_fraction=Distribution(kind="uniform", low=0.9, high=0.91),
                            regrowth_fraction=config.regrowth_fraction, lr_scale=config.lr_scale)
    changed = Cohort.from_config(narrower, 5, seed=7, defaults=defaults)
    assert [s.covariates["lr_scale"] for s in changed] == [s.covariates["lr_scale"] for s in large]


def test_fixed_values_and_defaults():
    """A number is the same for everyone; an unset covariate takes the protocol's value (pruning
    fraction; NaN regrowth = the arm's own; lr_scale 1)."""
    p = Protocol().replace(n_patients=3, cohort=CohortConfig(regrowth_fraction=0.3))
    covs = [s.covariates for s in ClinicalTrial(p, progress=False).cohort]
    assert covs == [{"prune_fraction": 0.95, "regrowth_fraction": 0.3, "lr_scale": 1.0}] * 3


def test_truncated_normal_and_choice_samples():
    """Truncated normal draws stay in range and keep their mean; choice draws only its values."""
    rng = np.random.default_rng(0)
    normal = Distribution(kind="normal", mean=1.0, sd=0.2, low=0.5, high=1.5)
    xs = np.array([normal.sample(rng) for _ in range(4000)])
    assert xs.min() >= 0.5 and xs.max() <= 1.5 and abs(xs.mean() - 1.0) < 0.02
    choice = Distribution(kind="choice", values=(0.3, 0.5, 0.7))
    assert {choice.sample(rng) for _ in range(200)} == {0.3, 0.5, 0.7}


@pytest.mark.parametrize(("table", "message"), [
    ({"kind": "uniform", "low": 0.9, "high": 0.9}, "low < high"),
    ({"kind": "normal", "mean": 0.5, "sd": 0.01, "low": 0.9, "high": 0.95}, "under 1 %"),
    ({"kind": "beta", "low": 0.1}, "unknown distribution 'beta'"),
    ({"kind": "choice", "values": []}, "non-empty"),
    ({"kind": "uniform", "low": 0.5}, "missing high"),
    ({"low": 0.5, "high": 0.6}, "needs kind"),
])
def test_invalid_distributions_are_refused(table, message):
    """Invalid distribution tables are refused when the study loads, with the covariate's path."""
    with pytest.raises(ProtocolError, match=r"cohort\.prune_fraction: .*" + message):
        Protocol.from_dict({"cohort": {"prune_fraction": table}})


def test_covariates_reach_the_results(results):
    """Each patient's drawn covariates are columns of the results table, constant within a patient."""
    trial, df = results
    assert set(COVARIATES) <= set(df.columns)
    for spec in trial.cohort:
        rows = df[df.patient == spec.index]
        for name in COVARIATES:
            assert (rows[name] == spec.covariates[name]).all(), name
    assert df.groupby("patient").prune_fraction.first().nunique() == len(trial.cohort)


def test_untreated_sparsity_matches_drawn_pruning_depth(results):
    """A patient's achieved sparsity after the lesion is its drawn prune_fraction (within 0.5 pp)."""
    trial, df = results
    got = df.query("arm == 'untreated' and phase == 'pruned' and metric == 'sparsity'").set_index("patient").value
    for spec in trial.cohort:
        assert got[spec.index] == pytest.approx(100 * spec.covariates["prune_fraction"], abs=0.5)


def test_regrowth_fraction_sets_ketamine_sparsity(results):
    """The ketamine-like arm regrows the patient's regrowth_fraction of the pruned weights:
    sparsity = 100 (1 - (1 - pf) - frac pf) within 0.5 pp, so deeper reserves leave sparser networks
    less sparse."""
    trial, df = results
    got = df.query("arm == 'ketamine' and phase == 'acute' and metric == 'sparsity'").set_index("patient").value
    for spec in trial.cohort:
        pf, frac = spec.covariates["prune_fraction"], spec.covariates["regrowth_fraction"]
        assert got[spec.index] == pytest.approx(100 * (1 - (1 - pf) - frac * pf), abs=0.5)
    assert len({s.covariates["regrowth_fraction"] for s in trial.cohort}) >= 2  # the check saw different reserves
