"""The model family's study files (studies/family/, sheets in /work/shared/family) load as shipped and
run end to end in a tiny form, each showing a property its sheet states.

Each file is read as it ships, then made tiny (2 patients, a 2-16-16-8-4 network, a few hundred
points, short courses) by merging small sizes into it; its schedule is kept as written. Study seeds
fix all randomness.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from virtualpatient import ClinicalTrial
from virtualpatient.protocol import Protocol
from virtualpatient.sweeps import load_plan

FAMILY = Path(__file__).resolve().parents[1] / "studies" / "family"

SMALL = {
    "n_patients": 2,
    "network": {"layer_sizes": [2, 16, 16, 8, 4]},
    "task": {"n_train": 256, "n_standard": 200, "n_clean": 40},
    "baseline": {"epochs": 3, "lr": 1e-2},
}


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _data(study: str) -> dict:
    return tomllib.loads((FAMILY / f"{study}.toml").read_text())


def tiny(study: str, **changes) -> Protocol:
    data = {k: v for k, v in _data(study).items() if k != "sweep"}
    return Protocol.from_dict(_merge(_merge(data, SMALL), changes), source=study)


@pytest.mark.parametrize("study", ["scarring", "consolidation", "chronic_stress"])
def test_family_study_ships_valid(study):
    """The shipped file loads with its own sizes (10 patients) and a schedule of its own."""
    protocol = Protocol.from_dict(_data(study), source=study)
    assert protocol.n_patients == 10 and protocol.regimens


@pytest.mark.parametrize(("study", "levels", "seeds"), [
    ("pruning_cliff_fresh", 9, 9), ("pruning_cliff_shared", 9, 1), ("dose_sweeps", 31, 1),
    ("regrowth_control", 2, 2)])
def test_family_sweeps_ship_valid(study, levels, seeds):
    """The sweep files load with their levels (Ch02: 9 depths; 068A: 11 + 11 + 9 doses); a fresh
    baseline gives each level its own seed, a shared one the study seed at every level."""
    plan = load_plan(FAMILY / f"{study}.toml")
    assert len(plan.levels()) == levels
    assert len({lv.protocol.seed for lv in plan.levels()}) == seeds


def test_scarring_kindling(tmp_path):
    """068E in tiny form: early adversity scars at most its draw (< 6 %) of the entries; each arm has
    six trigger verdicts per patient (cycles 0-5), a severity every cycle, and an autonomy verdict;
    the scar fraction after an event rises exactly when that cycle's trigger relapsed and never
    falls (scars are never regrown, even by the ketamine-like inter-episode regrowth)."""
    small_arm = {"epochs": 1, "score_batches": 2}
    df = ClinicalTrial(tiny("scarring", longitudinal={"durations": [2], "washout_steps": 4},
                            arms={"ketamine": small_arm, "ssri": {"epochs": 3}, "neurosteroid": {"epochs": 2},
                                  "ketamine_kindling": small_arm}), progress=False).run()
    early = df[(df.phase == "pruned") & (df.metric == "scar_fraction")].sort_values("patient").value.to_numpy()
    draw = df[df.metric == "scar_draw"].sort_values("patient").value.to_numpy()
    assert len(early) == 2 and np.all(early <= 100 * draw) and np.all(draw < 0.06)
    for arm in ("ketamine", "ssri", "neurosteroid"):
        rows = df[df.arm == arm]
        for p in range(2):
            verdict = rows[(rows.phase == "trigger") & (rows.metric == "relapsed") & (rows.patient == p)]
            assert list(verdict.sort_values("cycle").cycle) == list(range(6)), arm
            after = rows[(rows.phase == "after") & (rows.metric == "scar_fraction") & (rows.patient == p)]
            after = after.sort_values("cycle").value.to_numpy()
            acute = rows[(rows.phase == "acute") & (rows.metric == "scar_fraction")]
            start = acute[acute.patient == p].value.item()
            prev = np.concatenate([[start], after[:-1]])
            relapsed = verdict.sort_values("cycle").value.to_numpy() == 1
            assert np.all(after >= prev) and np.array_equal(after > prev, relapsed), (arm, p)
        assert len(rows[(rows.phase == "autonomy") & (rows.metric == "relapsed")]) == 2
        assert len(rows[(rows.phase == "state") & (rows.metric == "severity")]) == 6 * 2


def test_consolidation_parts_a_and_b():
    """Ch03 in tiny form: Part A has one battery per duration 0-20 and its relapse re-prunes to
    s + 0.4 (1 - s) with no cap; in Part B the sparsity shrinks by about (1 - f) per cycle from the
    pruned 95 % (10 cycle points for long chronic): each cycle regrows max(1, floor(f x still
    pruned)) per matrix, so the pruned count falls every cycle and lies within one per matrix of
    (1 - f) times the last one; full acute (f = 1) ends with no pruned weight."""
    df = ClinicalTrial(tiny("consolidation"), progress=False).run()
    a = df[df.arm == "consolidation"]
    assert sorted(a[a.phase == "battery"].maintenance_epochs.unique()) == [0, 5, 10, 15, 20]
    s = a[(a.phase == "battery") & (a.metric == "sparsity")].sort_values(["maintenance_epochs", "patient"]).value
    r = a[(a.phase == "relapse") & (a.metric == "sparsity")].sort_values(["maintenance_epochs", "patient"]).value
    np.testing.assert_allclose(r.to_numpy() / 100, s.to_numpy() / 100 + 0.4 * (1 - s.to_numpy() / 100), atol=0.01)
    for arm, f, n in (("acute_moderate", 0.6, 1), ("long_chronic", 0.4, 10), ("full_acute", 1.0, 1)):
        rows = df[(df.arm == arm) & (df.patient == 0) & (df.metric == "sparsity")]
        traj = rows[rows.phase == "cycle_sparsity"].sort_values("cycle").value.to_numpy() / 100
        start = rows[rows.phase == "start"].value.item() / 100
        assert len(traj) == n and start == pytest.approx(0.95, abs=0.01)
        sizes = SMALL["network"]["layer_sizes"]
        total = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        pruned = np.concatenate([[start], traj]) * total
        layers = len(sizes) - 1
        assert np.all(pruned[1:] >= (1 - f) * pruned[:-1] - layers), arm
        assert np.all(pruned[1:] < (1 - f) * pruned[:-1] + layers), arm
        assert np.all(np.diff(pruned) < 0), arm
    assert df[(df.arm == "full_acute") & (df.phase == "cycle_sparsity")].value.max() == 0.0


def _level_run(study: str, pick, **changes):
    plan = load_plan(FAMILY / f"{study}.toml", **SMALL, **changes)
    return [(lv, ClinicalTrial(lv.protocol, progress=False).run()) for lv in pick(plan.levels())]


def test_pruning_cliff_levels():
    """Ch02 (iii) in tiny form, the unpruned and the deepest level on fresh networks: the mask
    sparsity is the level's fraction, the all-parameter count reads below it once pruned (biases are
    never pruned), every battery condition is reported, and the two levels have different seeds
    (fresh networks per level, Ch02 fact 4)."""
    runs = _level_run("pruning_cliff_fresh", lambda lv: [lv[0], lv[-1]])
    got = {}
    for level, df in runs:
        frac = level.protocol.pruning.fraction
        sp = df[df.metric == "sparsity"].value.to_numpy()
        sp_all = df[df.metric == "sparsity_all"].value.to_numpy()
        np.testing.assert_allclose(sp, 100 * frac, atol=1.0)
        if frac > 0:
            assert np.all(sp_all < sp)
        got[frac] = level.protocol.seed
        assert {"clean", "standard", "internal_noise", "combined"} <= set(df.condition)
    assert got[0.0] != got[0.99]


def test_dose_sweeps_level():
    """068A in tiny form, one level: every arm reports the four dose metrics; the neurosteroid-like
    course changes no mask (sparsity change 0) while ketamine-like regrowth's sparsity change is the
    regrown share (pruned minus acute sparsity) and its turnover at least that; the sweep relapse
    removes 40 % of the live weights (sparsity s + 0.4 (1 - s)). Each level runs only its swept arm."""
    arms = {"ketamine": {"gain": 1.0, "epochs": 1, "score_batches": 2},
            "ssri": {"gain_end": 1.0, "lr": 1e-5, "epochs": 3}, "neurosteroid": {"gain": 1.0, "epochs": 2}}
    runs = _level_run("dose_sweeps", lambda lv: [lv[0], lv[11], lv[22]], arms=arms)
    # regimens = "swept": each level runs its own arm only (ketamine, ssri, neurosteroid levels)
    assert [sorted(set(df.arm) - {"untreated"}) for _, df in runs] == [["ketamine"], ["ssri"], ["neurosteroid"]]
    df = pd.concat([runs[0][1]] + [d[d.arm != "untreated"] for _, d in runs[1:]], ignore_index=True)
    dose = df[df.phase == "dose"]
    assert set(dose.metric) == {"dose_l1", "dose_l2", "turnover", "sparsity_change"}
    assert (dose.groupby("arm").size() == 4 * 2).all()
    ns = dose[dose.arm == "neurosteroid"]
    assert set(ns[ns.metric == "sparsity_change"].value) == {0.0}
    k = dose[dose.arm == "ketamine"].pivot(index="patient", columns="metric", values="value")
    sp = df[(df.metric == "sparsity") & (df.arm.isin(["untreated", "ketamine"]))
            & df.phase.isin(["pruned", "acute"])].pivot(index="patient", columns="phase", values="value")
    np.testing.assert_allclose(k.sparsity_change, (sp.pruned - sp.acute) / 100)
    assert (k.sparsity_change > 0).all() and (k.turnover >= k.sparsity_change).all()
    for arm, rows in df[df.arm != "untreated"].groupby("arm"):
        s = rows[(rows.phase == "acute") & (rows.metric == "sparsity")].sort_values("patient").value.to_numpy() / 100
        e = rows[(rows.phase == "sweep_relapse") & (rows.metric == "sparsity")].sort_values("patient").value
        e = e.to_numpy() / 100
        np.testing.assert_allclose(e, s + 0.4 * (1 - s), atol=0.01, err_msg=arm)


def test_regrowth_control_levels():
    """Ch02 (i, ii) in tiny form: both regrowth levels (gradient, random, each on a fresh network)
    run with different seeds, regrow to about 47.5 % mask sparsity, and report the input-noise tests
    at sd 1 and 2 and the four internal-noise levels of the Ch02 battery."""
    arms = {"ketamine": {"gain": 1.0, "regrow_fraction": 0.5, "epochs": 1, "score_batches": 2}}
    runs = _level_run("regrowth_control", lambda lv: lv, arms=arms)
    assert {lv.values["arms.ketamine.score"] for lv, _ in runs} == {"gradient", "random"}
    assert len({lv.protocol.seed for lv, _ in runs}) == 2
    for _, df in runs:
        regrown = df[df.phase == "regrown"]
        np.testing.assert_allclose(regrown[regrown.metric == "sparsity"].value, 47.5, atol=3)
        assert sorted(regrown[regrown.condition == "input_noise"].noise_sigma.unique()) == [1.0, 2.0]
        assert sorted(regrown[regrown.condition == "internal_noise"].noise_sigma.unique()) == [0.3, 0.5, 1.0, 1.5]
