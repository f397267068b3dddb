"""The example studies in studies/ load, and run end to end in a tiny form with the rows they promise.

Each study file is read as it ships, then made tiny (2 patients, a small network and task, short
courses and maintenance) by merging the tiny test protocol's sizes into it; its schedule is kept as
written. The study seeds fix all randomness.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from virtualpatient import ClinicalTrial
from virtualpatient.protocol import Protocol

STUDIES = Path(__file__).resolve().parents[1] / "studies"

SMALL = {
    "n_patients": 2,
    "network": {"layer_sizes": [2, 24, 24, 16, 4]},
    "task": {"n_train": 256, "n_standard": 200, "n_clean": 40},
    "baseline": {"epochs": 4, "lr": 1e-2},
    "longitudinal": {"durations": [2], "washout_steps": 4},
    "arms": {"ketamine": {"epochs": 1, "score_batches": 2}, "ssri": {"epochs": 3}, "neurosteroid": {"epochs": 2}},
}


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny(study: str, **changes) -> Protocol:
    data = tomllib.loads((STUDIES / f"{study}.toml").read_text())
    return Protocol.from_dict(_merge(_merge(data, SMALL), changes), source=study)


@pytest.fixture(scope="module")
def runs() -> dict[str, pd.DataFrame]:
    return {}


def _run(runs, study: str) -> pd.DataFrame:
    if study not in runs:
        runs[study] = ClinicalTrial(tiny(study), progress=False).run()
    return runs[study]


@pytest.mark.parametrize("study", ["sequencing", "taper", "second_episode", "family/chronic_stress",
                                   "washout_counterfactual"])
def test_example_study_ships_valid(study):
    """The shipped file loads with its own sizes (10 patients) and a schedule of its own."""
    protocol = Protocol.from_dict(tomllib.loads((STUDIES / f"{study}.toml").read_text()), source=study)
    assert protocol.n_patients == 10 and protocol.regimens


def test_sequencing(runs):
    """Three regimens; the bridged ones are assessed after the bridge and again after ketamine (later
    on the trial clock, by the bridge's epochs); every regimen ends with a relapse verdict per patient
    and maintenance duration; the ketamine course regrows to about 47.5 % sparsity in all three."""
    df = _run(runs, "sequencing")
    assert set(df.arm) == {"untreated", "ketamine_alone", "bridge_then_ketamine", "ssri_then_ketamine"}
    bridge = df[df.phase == "bridge"]
    assert set(bridge.arm) == {"bridge_then_ketamine", "ssri_then_ketamine"}
    acute = df[(df.phase == "acute") & (df.metric == "sparsity")].groupby("arm")
    assert acute.time.first().to_dict() == {"ketamine_alone": 1.0, "bridge_then_ketamine": 3.0,
                                            "ssri_then_ketamine": 4.0}
    assert np.all(np.abs(acute.value.mean() - 47.5) < 3)
    verdicts = df[df.metric == "relapsed"]
    assert len(verdicts) == 3 * 2 and set(verdicts.value) <= {0.0, 1.0}


def test_taper(runs):
    """Each arm appears abrupt and tapered; only tapered regimens report the 10 taper steps, whose gain
    moves linearly from the arm's on-drug gain to 1 (from 1.25 for ketamine); the taper's training
    puts the tapered wash-out 100 epochs later on the trial clock."""
    df = _run(runs, "taper")
    taper = df[df.phase == "taper"]
    assert set(taper.arm) == {f"{a}_taper" for a in ("ketamine", "ssri", "neurosteroid")}
    gain = taper[(taper.arm == "ketamine_taper") & (taper.metric == "gain") & (taper.patient == 0)].sort_values("step")
    np.testing.assert_allclose(gain.value, 1.25 + (1.0 - 1.25) * np.arange(1, 11) / 10, atol=1e-12)
    wash = df[df.phase == "washout"].groupby("arm").time.first()
    assert wash["ketamine_taper"] - wash["ketamine_abrupt"] == 100
    assert len(df[df.metric == "relapsed"]) == 6 * 2


def test_second_episode(runs):
    """Two verdicts per patient and regimen (after each course); the episode prunes 40 % of what
    remains; re-treatment is measured as acute_2; the trial clock orders the phases as run."""
    df = _run(runs, "second_episode")
    verdicts = df[df.metric == "relapsed"]
    assert (verdicts.groupby(["arm", "patient"]).size() == 2).all()
    assert set(verdicts.phase) == {"washout", "washout_2"}
    for arm, rows in df[df.arm != "untreated"].groupby("arm"):
        s = rows[(rows.phase == "acute") & (rows.metric == "sparsity")].sort_values("patient").value.to_numpy() / 100
        e = rows[(rows.phase == "episode") & (rows.metric == "sparsity")].sort_values("patient").value.to_numpy() / 100
        np.testing.assert_allclose(e, s + 0.4 * (1 - s), atol=0.01, err_msg=arm)
        t = rows.groupby("phase").time.first()
        assert t["acute"] < t["washout"] <= t["episode"] <= t["acute_2"] < t["washout_2"]


def test_chronic_stress(runs):
    """No gain anywhere; per arm 9 chronic points (cycle 0-8), each episode removes 10 % of what remains
    (ketamine never regrows between episodes, so its sparsity climbs), and the neurosteroid arm alone
    has off-medication rows; no biased test, no wash-out."""
    df = _run(runs, "family/chronic_stress")
    assert set(df[df.metric == "gain"].value) <= {1.0}
    assert not (df.condition == "biased").any() and not (df.phase == "washout").any()
    chronic = df[(df.phase == "chronic") & (df.metric == "sparsity")]
    for arm, rows in chronic.groupby("arm"):
        s = rows[rows.patient == 0].sort_values("cycle")
        assert list(s.cycle) == list(range(9)), arm
        x = s.value.to_numpy() / 100
        np.testing.assert_allclose(x[1:], x[:-1] + 0.1 * (1 - x[:-1]), atol=0.01, err_msg=arm)
    assert set(df[df.phase == "off_medication"].arm) == {"neurosteroid"}
    combined = df[(df.phase == "chronic") & (df.condition == "combined")]
    assert len(combined) == 3 * 2 * 9


def test_report_of_a_new_schedule_shows_trajectories_not_the_papers_tables(runs, tmp_path):
    """A schedule the paper never had (second_episode) gets per-arm trajectories over trial time and
    a relapse table in its report, and no paper table or claim that would not apply."""
    import json

    from analysis.report import is_paper_schedule, write_report

    protocol = tiny("second_episode")
    results = ClinicalTrial(protocol, progress=False).run(out=tmp_path / "run")
    assert not is_paper_schedule(results)
    text = write_report(tmp_path / "run", n_resamples=99).read_text()
    assert "## Trajectories over trial time" in text and "### Combined-stress accuracy (%)" in text
    assert "Table 1" not in text and "qualitative claims" not in text
    regimens = json.loads((tmp_path / "run" / "protocol.json").read_text())["regimens"]
    relapse = text[text.index("### Relapse"):]
    assert all(f"| {name} |" in relapse for name in regimens)
    assert any(p.name.startswith("trajectory_") for p in (tmp_path / "run" / "figures").iterdir())


def test_washout_counterfactual_washes_the_same_networks_out_at_every_rate(tmp_path):
    """Each arm's maintained networks are washed out once per label (own rate, 0.002, 0.008, 0.015,
    0.03), each from full protection on a copy of the same state: one verdict per patient, duration
    and label, and the protection left after the steps is exactly 1 - steps x that label's rate.
    The report ranks the arms per wash-out and leaves the paper's pooled tables out."""
    from analysis.report import is_paper_schedule, write_report
    from analysis.summaries import relapse_ranking

    protocol = tiny("washout_counterfactual")
    df = ClinicalTrial(protocol, progress=False).run(out=tmp_path / "run")
    assert not is_paper_schedule(df)
    steps = protocol.longitudinal.washout_steps
    labels = {"own": None, "decay_0.002": 0.002, "decay_0.008": 0.008, "decay_0.015": 0.015, "decay_0.03": 0.03}
    verdicts = df[df.metric == "relapsed"]
    protection = df[(df.metric == "protection")]
    for arm in ("ketamine", "ssri", "neurosteroid"):
        for label, rate in labels.items():
            rate = protocol.arms[arm].washout_decay if rate is None else rate
            rows = verdicts[(verdicts.arm == arm) & (verdicts.label == f"{label}/washout")]
            assert len(rows) == protocol.n_patients * len(protocol.longitudinal.durations)
            p = protection[(protection.arm == arm) & (protection.label == f"{label}/washout")]
            assert np.allclose(p[p.step == 0].value, 1.0)
            assert np.allclose(p[p.step == steps].value, max(0.0, 1.0 - steps * rate))
    assert set(relapse_ranking(df).orders) == {f"{label}/washout" for label in labels}
    text = write_report(tmp_path / "run", n_resamples=99).read_text()
    assert "### Relapse ranking per wash-out" in text and "qualitative claims" not in text
    from virtualpatient.cli import per_arm_summary

    summary = per_arm_summary(df)
    assert "relapsed % own" in summary and "relapsed % decay_0.03" in summary
