"""Iso-dose matching (analysis.dose_matching) and sheet 068A (analysis.family.dose_sweeps).

Planted sweeps in the 068A study's row layout (one swept column per arm, NaN on the other arms'
levels; every level repeats the untreated rows) check each stated rule against an independent
numpy/pandas computation; one tiny real run checks that the rows the study writes are read as
documented.  All randomness is seeded.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import dose_matching as dm
from analysis.family._sheet import NotTestable
from analysis.family.dose_sweeps import LEVEL, PUBLISHED_DOSE, SHEET, iso_dose, own_sweep

KET, SSRI, NEURO, UNT = "ketamine", "ssri", "neurosteroid", "untreated"
SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.5)
ROOT = Path(__file__).resolve().parents[1]


def sheet_like() -> dict:
    """A 068A-shaped sweep in which every finding holds (each level: dose, combined, drops, off)."""
    ket = {f: {"dose": 0.025 * f + 0.0012, "combined": 97.0, "drop": 0.0} for f in (0.05, 0.2, 0.5, 0.8)}
    ket[0.5]["combined"] = 96.9
    ssri = {e: {"dose": 8e-6 * e, "combined": 35.0 + 0.3 * e, "drop": 5.0} for e in (10.0, 50.0, 100.0, 200.0)}
    neuro = {d: {"dose": 0.0021 + 0.0065 * (d - 0.5), "combined": 97.5, "drop": 4.0, "off": 94.0 - 25.0 * (d - 0.5)}
             for d in (0.5, 0.7, 0.9)}
    return {KET: ket, SSRI: ssri, NEURO: neuro}


def planted(spec: dict, n_patients: int = 4, untreated: float = 30.0, noise: float = 0.5, seed: int = 0,
            fresh: bool = False) -> pd.DataFrame:
    """Rows as the 068A study writes them.  Patient p is offset by a fixed amount (offsets sum to 0) and
    acute/off combined get N(0, noise^2) within-patient noise; ``fresh`` shifts the untreated rows per level."""
    rng = np.random.default_rng(seed)
    offsets = np.linspace(-1.0, 1.0, n_patients)
    rows = []

    def add(level: dict, p: int, arm: str, phase: str, metric: str, value: float, condition: str = "",
            sigma: float = np.nan) -> None:
        rows.append({"patient": p, "arm": arm, "phase": phase, "metric": metric, "condition": condition,
                     "noise_sigma": sigma, "value": float(value), **{c: np.nan for c in LEVEL.values()}, **level,
                     "cohort": 0})

    for k, (arm, levels) in enumerate(spec.items()):
        for i, (setting, s) in enumerate(levels.items()):
            level = {LEVEL[arm]: setting}
            shift = (10 * k + i) if fresh else 0.0
            for p, off in enumerate(offsets):
                u = untreated + off + shift
                add(level, p, UNT, "pruned", "sparsity", 95.0)
                for cond, v in (("clean", 50.0 + off), ("standard", 44.0 + off), ("combined", u)):
                    add(level, p, UNT, "pruned", "accuracy", v, cond)
                for sg in SIGMAS:
                    add(level, p, UNT, "pruned", "accuracy", 28.0 + off, "internal_noise", sg)
                dose = s["dose"] * (1 + 0.1 * off)
                for metric, v in (("dose_l1", dose), ("dose_l2", dose / 2), ("turnover", 0.1), ("sparsity_change", 0)):
                    add(level, p, arm, "dose", metric, v)
                combined = s["combined"] + 0.5 * off + rng.normal(0, noise)
                add(level, p, arm, "acute", "sparsity", 47.5 if arm == KET else 95.0)
                add(level, p, arm, "acute", "accuracy", 100.0, "clean")
                add(level, p, arm, "acute", "accuracy", 99.5, "standard")
                add(level, p, arm, "acute", "accuracy", combined, "combined")
                for sg in SIGMAS:
                    add(level, p, arm, "acute", "accuracy", 90.0 - 10 * sg + off, "internal_noise", sg)
                if "off" in s:
                    add(level, p, arm, "off_medication", "accuracy", s["off"] + off + rng.normal(0, noise), "combined")
                    add(level, p, arm, "off_medication", "accuracy", 58.6 + off, "internal_noise", 2.5)
                add(level, p, arm, "acute_relapse", "relapse_drop", s["drop"] + 1.0 + off)
                add(level, p, arm, "sweep_relapse", "sparsity", 97.0)
                add(level, p, arm, "sweep_relapse", "relapse_drop", s["drop"] + 0.2 * off)
    return pd.DataFrame(rows)


def _pick(df, arm, phase, metric, condition=None, sigma=None):
    sel = df[(df.arm == arm) & (df.phase == phase) & (df.metric == metric)]
    if condition is not None:
        sel = sel[sel.condition == condition]
    if sigma is not None:
        sel = sel[sel.noise_sigma == sigma]
    return sel


# ---------------------------------------------------------------------------
# dose_table
# ---------------------------------------------------------------------------


def test_dose_table_means_improvement_efficiency_and_reversal():
    """Per arm and level, each column is the mean over patients of the level's rows; improvement is acute
    combined minus the untreated combined of the same patient; efficiency = improvement / (L1 + 1e-8) of
    the means; reversal = off-medication minus acute combined (NaN for arms without the test); the
    untreated rows, repeated at all 11 levels, are counted once."""
    df = planted(sheet_like())
    res = dm.dose_table(df)
    t = res.table
    assert len(t) == 11 and list(dict.fromkeys(t.arm)) == [KET, SSRI, NEURO]
    assert (t.n == 4).all()
    unt = _pick(df, UNT, "pruned", "accuracy", "combined").drop_duplicates("patient").set_index("patient").value
    for _, row in t.iterrows():
        col = LEVEL[row.arm]
        assert row.parameter == col
        rows = df[(df.arm == row.arm) & (df[col] == row.setting)]
        dose = _pick(rows, row.arm, "dose", "dose_l1").value.mean()
        comb = _pick(rows, row.arm, "acute", "accuracy", "combined").set_index("patient").value
        assert row.dose == pytest.approx(dose, rel=1e-12)
        assert row.combined == pytest.approx(comb.mean(), abs=1e-12)
        assert row.improvement == pytest.approx((comb - unt).mean(), abs=1e-12)
        assert row.efficiency == pytest.approx(row.improvement / (row.dose + 1e-8), rel=1e-12)
        assert row.extreme == pytest.approx(_pick(rows, row.arm, "acute", "accuracy", "internal_noise", 2.5)
                                            .value.mean(), abs=1e-12)
        assert row.relapse_drop == pytest.approx(_pick(rows, row.arm, "sweep_relapse", "relapse_drop")
                                                 .value.mean(), abs=1e-12)
        if row.arm == NEURO:
            off = _pick(rows, NEURO, "off_medication", "accuracy", "combined").set_index("patient").value
            assert row.reversal == pytest.approx((off - comb).mean(), abs=1e-12)
        else:
            assert np.isnan(row.reversal)
    assert res.untreated["combined"] == pytest.approx(unt.mean(), abs=1e-12)
    assert "Untreated (once)" in res.summary() and res.summary_frame().equals(t)


def test_dose_table_fresh_baselines_use_each_levels_untreated():
    """When the untreated rows differ between levels (fresh baselines), each configuration's improvement
    is taken against the untreated rows of its own level."""
    df = planted(sheet_like(), fresh=True)
    t = dm.dose_table(df).table
    for _, row in t.iterrows():
        rows = df[df[LEVEL[row.arm]] == row.setting]
        unt = _pick(rows, UNT, "pruned", "accuracy", "combined").set_index("patient").value
        comb = _pick(rows, row.arm, "acute", "accuracy", "combined").set_index("patient").value
        assert row.improvement == pytest.approx((comb - unt).mean(), abs=1e-12)


def test_dose_table_refuses_bad_input():
    """A table without dose rows, a non-DataFrame, missing columns and several rows per configuration and
    patient each raise with a message that names the problem."""
    df = planted(sheet_like(), n_patients=2)
    with pytest.raises(ValueError, match="no dose rows"):
        dm.dose_table(df[df.phase != "dose"])
    with pytest.raises(ValueError, match="no dose rows"):
        dm.dose_table(df, dose_metric="dose_l9")
    with pytest.raises(TypeError, match="DataFrame"):
        dm.dose_table(df.to_dict())
    with pytest.raises(ValueError, match="missing column"):
        dm.dose_table(df.drop(columns="phase"))
    with pytest.raises(ValueError, match="missing swept column"):
        dm.dose_table(df, swept="arms.ssri.gain_end")
    with pytest.raises(ValueError, match="several dose/dose_l1 rows"):
        dm.dose_table(df, swept=[])          # levels no longer told apart
    with pytest.raises(ValueError, match="no configuration with a finite dose"):
        dm.iso_dose_match(pd.DataFrame({"arm": ["a"], "label": [""], "dose": [np.nan]}))


# ---------------------------------------------------------------------------
# iso_dose_match
# ---------------------------------------------------------------------------


def _table(doses: dict[str, list[float]], **cols) -> pd.DataFrame:
    rows = [{"arm": a, "label": f"x={d}", "setting": d, "dose": d} for a, ds in doses.items() for d in ds]
    out = pd.DataFrame(rows)
    for name, values in cols.items():
        out[name] = values
    return out


def _nearest(frame: pd.DataFrame, arm: str, target: float) -> float:
    d = frame.loc[frame.arm == arm, "dose"].to_numpy()
    return float(d[np.argmin(np.abs(d - target))])


def test_overlapping_ranges_give_evenly_spaced_targets_across_the_window():
    """With overlapping dose ranges the targets are n evenly spaced points from the largest per-arm minimum
    to the smallest per-arm maximum, and each arm's match is its configuration nearest the target."""
    rng = np.random.default_rng(1)
    doses = {"a": sorted(rng.uniform(1, 6, 7)), "b": sorted(rng.uniform(2, 9, 5)), "c": sorted(rng.uniform(0, 5, 6))}
    frame = _table(doses)
    m = dm.iso_dose_match(frame, n_targets=5)
    lo = max(min(v) for v in doses.values())
    hi = min(max(v) for v in doses.values())
    assert lo <= hi and m.rule == "overlap"
    np.testing.assert_allclose(m.targets, np.linspace(lo, hi, 5), atol=1e-12)
    assert len(m.matches) == 15
    for _, row in m.matches.iterrows():
        assert row.dose == _nearest(frame, row.arm, row.target)
        assert row.dose_minus_target == pytest.approx(row.dose - row.target, abs=1e-15)


def test_disjoint_ranges_fall_back_to_percentiles_of_the_pooled_doses():
    """When one arm's whole range lies below the others' (068A's SSRI-like course), the window is empty and
    the targets are the 20/40/60/80th percentiles (linear) of all pooled doses; matches can be far off."""
    doses = {"ket": [0.0025, 0.006, 0.011, 0.0206], "ssri": [0.0001, 0.0004, 0.0016], "ns": [0.0021, 0.0028, 0.0034]}
    frame = _table(doses)
    m = dm.iso_dose_match(frame)
    pooled = np.concatenate([np.asarray(v) for v in doses.values()])
    assert m.rule == "percentiles" and m.window[0] > m.window[1]
    np.testing.assert_allclose(m.targets, np.percentile(pooled, [20, 40, 60, 80]), atol=1e-15)
    for _, row in m.matches.iterrows():
        assert row.dose == _nearest(frame, row.arm, row.target)
    ssri = m.matches[m.matches.arm == "ssri"]
    assert ssri.dose_minus_target.min() < -0.005          # the top target is 3x the SSRI-like maximum
    assert "No dose common to every arm" in m.summary()
    other = dm.iso_dose_match(frame, percentiles=(50,))
    np.testing.assert_allclose(other.targets, [np.median(pooled)], atol=1e-15)


def test_nearest_dose_picks_the_closest_configuration_on_either_side():
    """Target 2.9 matches dose 2 (0.9 away, not 4 at 1.1); target 3.1 matches 4 (0.9 away, not 2 at 1.1)."""
    frame = _table({"a": [1.0, 2.0, 4.0], "b": [2.9, 3.1]})
    m = dm.iso_dose_match(frame, n_targets=2)
    np.testing.assert_allclose(m.targets, [2.9, 3.1])
    assert m.matches[m.matches.arm == "a"].dose.tolist() == [2.0, 4.0]
    assert m.matches[m.matches.arm == "b"].dose.tolist() == [2.9, 3.1]


def test_rankings_order_combined_down_relapse_up_efficiency_down():
    """At each target the arms are ranked by combined (highest first), relapse drop (smallest first) and
    efficiency (highest first); rank 1 is the best of each."""
    frame = _table({"a": [1.0], "b": [1.0], "c": [1.0]}, combined=[90.0, 97.0, 95.0], relapse_drop=[0.5, 10.0, -1.0],
                   efficiency=[30.0, 10.0, 20.0])
    m = dm.iso_dose_match(frame, n_targets=1)
    order = dict(zip(m.rankings.ranking, m.rankings.order, strict=True))
    assert order == {"combined": "b > c > a", "relapse drop": "c > a > b", "efficiency": "a > c > b"}
    ranks = m.matches.set_index("arm")
    assert ranks.rank_combined.to_dict() == {"a": 3, "b": 1, "c": 2}
    assert ranks.rank_relapse.to_dict() == {"a": 2, "b": 3, "c": 1}
    assert ranks.rank_efficiency.to_dict() == {"a": 1, "b": 3, "c": 2}


def test_iso_dose_match_refuses_bad_arguments():
    """One arm only, a non-positive number of targets, percentiles outside 0-100 and a wrong table type raise."""
    frame = _table({"a": [1.0, 2.0], "b": [1.5]})
    with pytest.raises(ValueError, match="at least two arms"):
        dm.iso_dose_match(frame[frame.arm == "a"])
    with pytest.raises(ValueError, match="n_targets"):
        dm.iso_dose_match(frame, n_targets=0)
    with pytest.raises(ValueError, match="percentiles"):
        dm.iso_dose_match(frame, percentiles=(20, 120))
    with pytest.raises(TypeError, match="DoseTable"):
        dm.iso_dose_match([1, 2])
    with pytest.raises(ValueError, match="missing column"):
        dm.iso_dose_match(frame.drop(columns="dose"))


def test_arm_sweep_summary_reports_range_extremes_and_best_efficiency():
    """Per arm: number of configurations, dose min/max/mean, best (max) and worst (min) improvement, best
    (smallest) and worst relapse drop, max and mean efficiency and the setting with the best efficiency."""
    t = dm.dose_table(planted(sheet_like()))
    s = dm.arm_sweep_summary(t).table.set_index("arm")
    for arm, g in t.table.groupby("arm"):
        row = s.loc[arm]
        assert row.n_configurations == len(g)
        assert (row.dose_min, row.dose_max) == (g.dose.min(), g.dose.max())
        assert row.dose_mean == pytest.approx(g.dose.mean())
        assert (row.improvement_best, row.improvement_worst) == (g.improvement.max(), g.improvement.min())
        assert (row.relapse_drop_best, row.relapse_drop_worst) == (g.relapse_drop.min(), g.relapse_drop.max())
        assert row.efficiency_max == g.efficiency.max()
        assert row.best_efficiency_setting == g.setting.iloc[int(np.argmax(g.efficiency))]
    assert "Per-arm dose sweep summary" in dm.arm_sweep_summary(t).summary()


def test_dose_matching_imports_no_torch_or_paper_code():
    """Like analysis.dose_response, the general module imports only the standard library, numpy/pandas and
    analysis._results (never virtualpatient or the paper's analysis); the 068A sheet loads no torch."""
    import subprocess
    import sys

    tree = ast.parse((ROOT / "analysis" / "dose_matching.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names and names <= {"__future__", "math", "collections.abc", "numpy", "pandas", "analysis._results"}
    code = "import sys, analysis.family.dose_sweeps, analysis.dose_matching; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# Sheet 068A
# ---------------------------------------------------------------------------


def test_published_doses_are_the_study_defaults_and_sweep_levels():
    """The main comparison is read at each arm's published dose (regrowth 0.5, 100 epochs, damping 0.7):
    the study file's default for the arm, and one of its sweep levels."""
    from virtualpatient.sweeps import load_plan

    plan = load_plan(ROOT / "studies" / "family" / "dose_sweeps.toml")
    fields = {KET: "regrow_fraction", SSRI: "epochs", NEURO: "damping"}
    for arm, value in PUBLISHED_DOSE.items():
        assert getattr(plan.protocol.arms[arm], fields[arm]) == pytest.approx(value)
        assert any(lv.values.get(LEVEL[arm]) == pytest.approx(value) for lv in plan.levels())


def test_sheet_reads_the_main_comparison_at_the_published_dose():
    """Each main-comparison quantity reads the arm's rows at its published dose (ketamine-like combined
    96.9 there, 97.0 elsewhere), the untreated once per patient; every published cell has a quantity and
    is readable on a 068A-shaped run; no SD is published (one seed)."""
    df = planted(sheet_like(), noise=0.0)
    q = {x.name: x for x in SHEET.quantities}
    comb = q["combined %"].per_patient(df, KET)
    want = _pick(df[df[LEVEL[KET]] == 0.5], KET, "acute", "accuracy", "combined").set_index("patient").value
    pd.testing.assert_series_equal(comb, want, check_names=False, check_index_type=False)
    assert comb.mean() == pytest.approx(96.9)
    unt = q["combined %"].per_patient(df, UNT)
    assert len(unt) == 4 and unt.index.is_unique and unt.mean() == pytest.approx(30.0)
    assert q["acute relapse drop (points)"].per_patient(df, UNT).empty
    assert q["off-medication combined %"].per_patient(df, NEURO).mean() == pytest.approx(94.0 - 25.0 * 0.2)
    assert q["combined % at 10 epochs"].per_patient(df, SSRI).mean() == pytest.approx(38.0)
    assert q["combined % at 200 epochs"].per_patient(df, KET).empty
    assert q["sweep L1 dose min"].per_patient(df, SSRI).mean() == pytest.approx(8e-5)
    assert q["sweep combined min %"].per_patient(df, KET).mean() == pytest.approx(96.9)
    repeats = _pick(df, KET, "acute", "accuracy", "combined").assign(**{LEVEL[KET]: np.nan, LEVEL[SSRI]: 10.0})
    with_repeats = pd.concat([df, repeats.assign(value=0.0)], ignore_index=True)    # regimens = "all"
    assert len(own_sweep(with_repeats)) == len(df)
    pd.testing.assert_series_equal(q["combined %"].per_patient(with_repeats, KET), comb)
    assert SHEET.n_published == 1 and all(sd is None for _, sd in SHEET.published.values())
    for name, arm in SHEET.published:
        assert name in q and arm in SHEET.arms
        assert not q[name].per_patient(df, arm).empty, (name, arm)


def _decide(spec, **kw):
    df = planted(spec, **kw)
    return {f.id: f.decide(df) for f in SHEET.findings}


def test_every_finding_holds_on_a_sheet_like_sweep():
    """On the 068A-shaped sweep every finding holds, and each detail carries numbers."""
    out = _decide(sheet_like())
    assert all(ok for ok, _ in out.values()), out
    assert all(any(ch.isdigit() for ch in detail) for _, detail in out.values())
    assert "percentiles" in out["068A-4"][1]


@pytest.mark.parametrize(("finding", "change"), [
    ("068A-1", lambda s: s[KET][0.05].update(combined=94.0)),
    ("068A-2", lambda s: [v.update(combined=95.0 - 0.2 * e) for e, v in s[SSRI].items()]),
    ("068A-3", lambda s: [v.update(off=80.0 + 20.0 * (d - 0.5)) for d, v in s[NEURO].items()]),
    ("068A-4", lambda s: s[SSRI][200.0].update(dose=0.003)),
    ("068A-5", lambda s: s[KET][0.8].update(drop=1.5)),
])
def test_each_finding_fails_where_its_rule_is_broken(finding, change):
    """Breaking one rule (one fraction below 96 %, a falling SSRI-like course, off-medication accuracy rising
    with damping, an SSRI-like dose inside the neurosteroid-like range, one ketamine-like drop of 1.5 points)
    fails that finding and only that one."""
    spec = copy.deepcopy(sheet_like())
    change(spec)
    out = _decide(spec)
    assert not out[finding][0]
    assert all(ok for fid, (ok, _) in out.items() if fid != finding), out


def test_findings_not_testable_without_the_sweep_or_with_one_patient():
    """The trend findings need 2 patients (the published single seed is not enough); every finding needs
    the sweep's columns."""
    one = planted(sheet_like(), n_patients=1)
    for fid in ("068A-2", "068A-3"):
        with pytest.raises(NotTestable, match="2 patients"):
            next(f for f in SHEET.findings if f.id == fid).decide(one)
    plain = planted(sheet_like()).drop(columns=list(LEVEL.values()))
    for f in SHEET.findings:
        with pytest.raises(NotTestable):
            f.decide(plain)


# ---------------------------------------------------------------------------
# A tiny real run
# ---------------------------------------------------------------------------


def test_tiny_run_reads_as_documented():
    """068A in tiny form, two levels per arm (the published dose and one other): the dose table's
    improvement is acute minus untreated combined per patient, the untreated rows repeated at every
    level are read once, the main comparison is read at the published dose, and every match is its
    arm's nearest configuration."""
    from test_family_studies import FAMILY, SMALL

    from virtualpatient.sweeps import load_plan, run_sweep

    arms = {"ketamine": {"gain": 1.0, "epochs": 1, "score_batches": 2},
            "ssri": {"gain_end": 1.0, "lr": 1e-5, "epochs": 3}, "neurosteroid": {"gain": 1.0, "epochs": 2}}
    plan = load_plan(FAMILY / "dose_sweeps.toml", **SMALL, arms=arms)
    lv = plan.levels()
    df = run_sweep(plan, None, progress=False, levels=[lv[0], lv[7], lv[11], lv[18], lv[22], lv[26]])
    assert own_sweep(df).shape == df.shape            # regimens = "swept": no repeats to drop
    table, match, summary = iso_dose(df)
    t = table.table
    assert sorted(t.groupby("arm").size().tolist()) == [2, 2, 2]
    unt = _pick(df, UNT, "pruned", "accuracy", "combined")
    assert unt.groupby("patient").value.nunique().eq(1).all()      # identical at every level
    unt = unt.drop_duplicates("patient").set_index("patient").value
    for _, row in t.iterrows():
        rows = df[df[LEVEL[row.arm]] == row.setting]
        comb = _pick(rows, row.arm, "acute", "accuracy", "combined").set_index("patient").value
        assert row.improvement == pytest.approx((comb - unt).mean(), abs=1e-9)
    q = {x.name: x for x in SHEET.quantities}
    for arm, dose in PUBLISHED_DOSE.items():
        got = q["combined %"].per_patient(df, arm).sort_index()
        rows = df[df[LEVEL[arm]] == dose]
        want = _pick(rows, arm, "acute", "accuracy", "combined").set_index("patient").value.sort_index()
        np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    assert len(q["combined %"].per_patient(df, UNT)) == 2
    for _, row in match.matches.iterrows():
        assert row.dose == _nearest(t, row.arm, row.target)
    assert set(summary.table.n_configurations) == {2}
