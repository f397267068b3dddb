"""Sweeps and replication: levels equal separate runs, resume recomputes nothing, bad specs fail early."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from test_bad_input import TINY

from virtualpatient import ClinicalTrial, trial
from virtualpatient.cli import main
from virtualpatient.protocol import Protocol, ProtocolError
from virtualpatient.sweeps import SweepSpec, cohort_seed, expand, load_plan, reused_spine_epochs, run_sweep

SWEEP = TINY + """
[sweep]
mode = "grid"
[sweep.fields]
"pruning.fraction" = [0.9, 0.95]
"""


def _study(tmp: Path, text: str) -> Path:
    path = tmp / "sweep.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    base = tmp_path_factory.mktemp("sweep")
    study = _study(base, SWEEP)
    out = base / "run"
    return study, out, run_sweep(load_plan(study), out, progress=False)


def test_each_level_equals_a_separate_run_of_its_settings(swept):
    """Bit for bit: the sweep's rows of a level equal ClinicalTrial on that level's protocol, and the
    swept column carries the level's value."""
    study, _, results = swept
    plan = load_plan(study)
    for level in plan.levels():
        alone = ClinicalTrial(level.protocol, progress=False).run()
        mine = results[results["pruning.fraction"] == level.values["pruning.fraction"]]
        mine = mine.drop(columns=["pruning.fraction", "cohort"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, check_exact=True)
    sparsity = results.query("phase == 'pruned' and metric == 'sparsity'").groupby("pruning.fraction").value.mean()
    assert sparsity[0.9] < sparsity[0.95] and abs(sparsity[0.9] - 90) < 1 and abs(sparsity[0.95] - 95) < 1


def test_resume_recomputes_nothing_and_more_levels_compute_only_the_new(swept, monkeypatch):
    """A second run on the folder reads every unit back (no training at all); a sweep with one more
    value runs only that level's units."""
    study, out, results = swept
    calls = []
    real_baseline, real_arm = trial.run_baseline, trial.run_arm
    monkeypatch.setattr(trial, "run_baseline", lambda *a, **k: calls.append("baseline") or real_baseline(*a, **k))
    monkeypatch.setattr(trial, "run_arm", lambda *a, **k: calls.append("arm") or real_arm(*a, **k))
    again = run_sweep(load_plan(study), out, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again, results, check_exact=True)
    wider = _study(study.parent, SWEEP.replace("[0.9, 0.95]", "[0.9, 0.95, 0.97]"))
    more = run_sweep(load_plan(wider), out, progress=False)
    assert calls.count("baseline") == 1 and calls.count("arm") == 3
    assert sorted(more["pruning.fraction"].unique()) == [0.9, 0.95, 0.97]
    assert len(list((out / "levels").iterdir())) == 3


def test_replication_cohort_zero_is_the_study_and_cohorts_differ(tmp_path):
    """Cohort 0 keeps the study seed (its rows equal the plain study); cohort 1 has another seed and
    other numbers; results carry the cohort number."""
    study = _study(tmp_path, TINY + "\n[sweep]\ncohorts = 2\n")
    results = run_sweep(load_plan(study), None, progress=False)
    plain = ClinicalTrial(Protocol.from_dict(tomllib.loads(TINY)), progress=False).run()
    first = results[results.cohort == 0].drop(columns="cohort").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, plain, check_exact=True)
    second = results[results.cohort == 1].reset_index(drop=True)
    assert not second["value"].equals(first["value"])
    assert cohort_seed(4, 1) != 4 and cohort_seed(4, 1) == cohort_seed(4, 1)


def test_fresh_baseline_gives_each_level_its_own_seed():
    """baseline = "fresh": level seeds differ and do not depend on the other levels; "shared": one seed."""
    p = Protocol.from_dict(tomllib.loads(TINY))
    fresh = expand(p, SweepSpec(fields={"pruning.fraction": [0.9, 0.95]}, baseline="fresh"))
    wider = expand(p, SweepSpec(fields={"pruning.fraction": [0.8, 0.9, 0.95]}, baseline="fresh"))
    shared = expand(p, SweepSpec(fields={"pruning.fraction": [0.9, 0.95]}))
    assert len({lv.protocol.seed for lv in fresh}) == 2
    assert [lv.protocol.seed for lv in fresh] == [lv.protocol.seed for lv in wider[1:]]
    assert {lv.protocol.seed for lv in shared} == {p.seed}
    assert [lv.name for lv in fresh] == [lv.name for lv in wider[1:]]


def test_wildcard_sets_the_field_in_every_arm_that_has_it():
    """``arms.*.washout_decay`` sets every arm's decay; a zip pairs values level by level."""
    p = Protocol.from_dict(tomllib.loads(TINY))
    levels = expand(p, SweepSpec(fields={"arms.*.washout_decay": [0.004, 0.02], "pruning.fraction": [0.9, 0.95]},
                                 mode="zip"))
    assert [(lv.values["arms.*.washout_decay"], lv.values["pruning.fraction"]) for lv in levels] == \
        [(0.004, 0.9), (0.02, 0.95)]
    assert {t.washout_decay for t in levels[1].protocol.arms.values()} == {0.02}


def test_a_range_is_inclusive_and_rounded():
    """{start, stop, num} gives num evenly spaced values, both ends included, as written decimals."""
    spec = SweepSpec(fields={"pruning.fraction": {"start": 0.8, "stop": 0.99, "num": 20}})
    values = spec.fields["pruning.fraction"]
    assert len(values) == 20 and values[0] == 0.8 and values[-1] == 0.99 and values[1] == 0.81


@pytest.mark.parametrize(("table", "fragment"), [
    ('"pruning.fractoin" = [0.9]', "'pruning.fractoin' is not a protocol field"),
    ('"pruning.fraction" = []', "needs a non-empty list of values"),
    ('"pruning.fraction" = [0.9, 1.5]', "sweep level pruning.fraction = 1.5: pruning.fraction"),
    ('"pruning.fraction" = [0.9, 0.9]', "values must be distinct"),
    ('"arms.*.nonsense" = [1]', "no arm has a field 'nonsense'"),
    ('"name" = ["a", "b"]', "cannot vary the study's name"),
    ('"pruning.fraction" = {start = 0.8, stop = 0.9}', "a range is {start, stop, num}"),
    ('"pruning.fraction" = {start = 0.8, stop = 0.99, num = 1000}', "1 <= num <= 256"),
])
def test_bad_sweep_specs_fail_before_any_work(table, fragment, tmp_path, capsys):
    """Each bad spec: exit 2, one line naming the problem; no run folder made."""
    study = _study(tmp_path, TINY + "\n[sweep.fields]\n" + table + "\n")
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert fragment in line, line
    assert not out.exists()


def test_grid_over_the_limit_needs_yes(tmp_path, capsys):
    """A 300-level grid is refused without --yes (exit 2, one line), before any work."""
    text = TINY + '\n[sweep.fields]\n"pruning.fraction" = {start = 0.8, stop = 0.99, num = 20}\n' \
                  '"arms.*.washout_decay" = {start = 0.001, stop = 0.02, num = 15}\n'
    study = _study(tmp_path, text)
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "300 levels x cohorts, more than 256" in line and "--yes" in line
    with pytest.raises(ProtocolError):
        load_plan(study).levels()
    assert len(load_plan(study).levels(max_levels=None)) == 300


def test_zip_of_unequal_lists_is_refused():
    """zip needs lists of one length."""
    p = Protocol.from_dict(tomllib.loads(TINY))
    with pytest.raises(ProtocolError, match="zip needs value lists of one length"):
        expand(p, SweepSpec(fields={"pruning.fraction": [0.9, 0.95], "seed": [1, 2, 3]}, mode="zip"))


def test_run_command_prints_a_per_arm_summary_with_the_swept_column(swept, capsys):
    """``virtualpatient run`` on a finished sweep folder: exit 0, a summary row per level and arm."""
    study, out, _ = swept
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "pruning.fraction" in text and "relapsed %" in text
    assert sum(line.split()[:1] in (["0.90"], ["0.9"], ["0.95"]) for line in text.splitlines()) >= 2


def test_reproduce_refuses_a_sweep_and_load_study_says_why(tmp_path, capsys):
    """A sweep study given to ``reproduce`` (or load_study) names the command to use."""
    study = _study(tmp_path, SWEEP)
    assert main(["reproduce", "--study", str(study), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "virtualpatient run" in capsys.readouterr().err
    from virtualpatient import load_study

    with pytest.raises(ProtocolError, match=r"\[sweep\] table"):
        load_study(study)


def test_each_mode_sweeps_one_field_at_a_time():
    """mode = "each": one level per value of each field, the other fields at the study's values."""
    p = Protocol.from_dict(tomllib.loads(TINY))
    levels = expand(p, SweepSpec(fields={"arms.ssri.gain_end": [1.2, 1.4], "arms.neurosteroid.damping": [0.5]},
                                 mode="each"))
    assert [lv.values for lv in levels] == [{"arms.ssri.gain_end": 1.2}, {"arms.ssri.gain_end": 1.4},
                                            {"arms.neurosteroid.damping": 0.5}]
    assert levels[2].protocol.arms["ssri"].gain_end == p.arms["ssri"].gain_end
    assert levels[2].protocol.arms["neurosteroid"].damping == 0.5


@pytest.mark.parametrize(("name", "n_levels", "columns"), [
    ("pruning_cliff", 20, ["pruning.fraction"]),
    ("dose_response", 20, ["arms.ketamine.regrow_fraction", "arms.ssri.epochs", "arms.ssri.gain_end",
                           "arms.neurosteroid.damping"]),
    ("replication", 5, []),
])
def test_shipped_sweep_studies_load_and_expand(name, n_levels, columns):
    """Each shipped sweep study validates every level; its levels and swept fields are as documented."""
    plan = load_plan(Path(__file__).resolve().parents[1] / "studies" / f"{name}.toml")
    levels = plan.levels()
    assert len(levels) == n_levels and list(plan.sweep.fields) == columns
    assert len({lv.name for lv in levels}) == n_levels
    if name == "pruning_cliff":
        assert [lv.values["pruning.fraction"] for lv in levels][::19] == [0.8, 0.99]
    if name in ("pruning_cliff", "dose_response"):  # acute questions: no maintenance is trained
        assert all(lv.protocol.longitudinal.durations == () for lv in levels)
        # the baseline training is run by the first level only (shared spine or shared training)
        assert reused_spine_epochs(levels) == [0] + [plan.protocol.baseline.epochs] * (n_levels - 1)
    if name == "replication":  # every cohort its own patients
        assert reused_spine_epochs(levels) == [0] * n_levels
    if name == "replication":
        assert [lv.cohort for lv in levels] == [0, 1, 2, 3, 4] and levels[0].protocol.seed == plan.protocol.seed


def test_swept_regimens_run_only_the_swept_arm_with_the_same_rows():
    """regimens = "swept": a level that sets an arm's field runs only the regimens treating with that
    arm (plus the spine), and their rows equal those of the same level run with every regimen, bit for
    bit (each regimen draws its own streams); a level of a non-arm field keeps every regimen."""
    p = Protocol.from_dict(tomllib.loads(TINY))
    fields = {"arms.ssri.gain_end": [1.3]}
    swept = expand(p, SweepSpec(fields=fields, mode="each", regimens="swept"))[0].protocol
    full = expand(p, SweepSpec(fields=fields, mode="each"))[0].protocol
    assert list(swept.regimens) == ["ssri"] and swept.arms["ssri"].gain_end == 1.3
    rows_swept = ClinicalTrial(swept, progress=False).run()
    rows_full = ClinicalTrial(full, progress=False).run()
    assert set(rows_swept.arm) == {"untreated", "ssri"} and {"ketamine", "neurosteroid"} <= set(rows_full.arm)
    keep = rows_full.arm.isin(["untreated", "ssri"])
    pd.testing.assert_frame_equal(rows_swept.reset_index(drop=True), rows_full[keep].reset_index(drop=True),
                                  check_exact=True)
    other = expand(p, SweepSpec(fields={"pruning.fraction": [0.9]}, regimens="swept"))[0].protocol
    assert other.regimens is None or set(other.regimens) == set(p.arms)


def test_levels_that_share_a_spine_train_it_once(tmp_path, monkeypatch):
    """A sweep of arm fields (shared baseline) trains the spine at the first level only; the later
    levels adopt its units and still equal separate runs of their settings bit for bit. A lesion
    sweep changes the spine, so every level trains its own."""
    text = TINY + '\n[sweep]\n[sweep.fields]\n"arms.ssri.gain_end" = [1.3, 1.5]\n'
    study = _study(tmp_path, text)
    calls = []
    real = trial.run_baseline
    monkeypatch.setattr(trial, "run_baseline", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = run_sweep(load_plan(study), tmp_path / "run", progress=False)
    n_chunks = len(calls)
    assert n_chunks >= 1
    for level in load_plan(study).levels():
        mine = results[results["arms.ssri.gain_end"] == level.values["arms.ssri.gain_end"]]
        mine = mine.drop(columns=["arms.ssri.gain_end", "cohort"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, ClinicalTrial(level.protocol, progress=False).run(), check_exact=True)
    # the separate runs above trained the spine once each; the sweep itself only for its first level
    assert len(calls) == 3 * n_chunks
    from virtualpatient.sweeps import spine_key
    p = Protocol.from_dict(tomllib.loads(TINY))
    lesions = expand(p, SweepSpec(fields={"pruning.fraction": [0.9, 0.95]}))
    assert spine_key(lesions[0].protocol) != spine_key(lesions[1].protocol)


def test_per_arm_summary_keeps_the_levels_of_a_one_field_at_a_time_sweep():
    """mode = "each" leaves the other fields NaN in a level's rows; the summary still shows every level
    (the field it does not set as "-"), in run order, instead of dropping rows with a NaN key; each
    arm's accuracy is its acute assessment's, not pooled with the acute-relapse one."""
    from virtualpatient.cli import per_arm_summary

    rows = []
    for a, b, arm, value in [(0.1, None, "ketamine", 80.0), (0.5, None, "ketamine", 90.0),
                             (None, 0.6, "neurosteroid", 70.0)]:
        for patient in (0, 1):
            for phase, shift in (("acute", 0.0), ("acute_relapse", -50.0)):  # only the acute one is shown
                rows.append({"a": a, "b": b, "arm": arm, "patient": patient, "step": None, "maintenance_epochs": None,
                             "phase": phase, "metric": "accuracy", "condition": "combined",
                             "value": value + patient + shift})
    text = per_arm_summary(pd.DataFrame(rows).astype({"a": float, "b": float}), by=["a", "b"])
    lines = [line.split() for line in text.splitlines()[2:]]
    assert lines == [["0.1", "-", "ketamine", "2", "acute", "80.5"], ["0.5", "-", "ketamine", "2", "acute", "90.5"],
                     ["-", "0.6", "neurosteroid", "2", "acute", "70.5"]]


def test_an_unfinished_sweep_reports_its_finished_levels(swept, tmp_path, capsys):
    """A sweep folder without its results.csv (still running, or interrupted) is reported from the
    levels that finished: their rows equal the finished sweep's rows of those levels, and the report
    says how many of the planned levels it covers."""
    from analysis.report import load_run

    _, out, _ = swept
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "results.csv").unlink()
    plan = json.loads((partial / "levels.json").read_text())
    n = len(plan["levels"])  # 2, or 3 once the resume test has added a level
    assert plan["fields"] == ["pruning.fraction"] and n >= 2
    for level in plan["levels"][1:]:
        (partial / "levels" / level["name"] / "results.csv").unlink()
    run = load_run(partial)
    full = load_run(out).results
    assert run.partial == (1, n)
    expected = full[full["pruning.fraction"] == plan["levels"][0]["values"]["pruning.fraction"]]
    pd.testing.assert_frame_equal(run.results, expected.reset_index(drop=True))
    assert main(["report", str(partial)]) == 0
    assert "unfinished sweep" in capsys.readouterr().out
    assert f"**Unfinished sweep: 1 of {n} levels have finished.**" in (partial / "report.md").read_text()


def test_an_unfinished_sweep_with_nothing_finished_or_a_hostile_plan_is_refused(swept, tmp_path, capsys):
    """No finished level, or a plan whose level name would lead out of the folder, is one line, exit 2."""
    _, out, _ = swept
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "results.csv").unlink()
    plan = json.loads((partial / "levels.json").read_text())
    for level in plan["levels"]:
        (partial / "levels" / level["name"] / "results.csv").unlink()
    assert main(["report", str(partial)]) == 2
    assert f"no level of the sweep has finished yet (0 of {len(plan['levels'])})" in capsys.readouterr().err
    plan["levels"][0]["name"] = "../../elsewhere"
    (partial / "levels.json").write_text(json.dumps(plan))
    assert main(["report", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "is not a sweep plan" in err and len(err.strip().splitlines()) == 1


def test_trained_key_leaves_out_only_the_lesion():
    """Levels that differ only in the lesion share the key of the spine's training; another training
    setting or another seed does not; a spine that trains nothing before its lesion has none."""
    from virtualpatient.phases import Assess, Lesion
    from virtualpatient.sweeps import trained_key

    data = tomllib.loads(TINY)
    p = Protocol.from_dict(data)
    key = trained_key(p)
    assert key is not None
    assert trained_key(Protocol.from_dict({**data, "pruning": {"fraction": 0.8}})) == key
    assert trained_key(Protocol.from_dict({**data, "seed": 5})) != key
    assert trained_key(Protocol.from_dict({**data, "baseline": {"epochs": 3}})) != key
    assert trained_key(p.replace(schedule=[Lesion(), Assess(label="pruned")])) is None


def test_a_lesion_sweep_trains_each_patient_once_with_the_same_numbers(monkeypatch, tmp_path):
    """A lesion sweep with shared baselines trains each patient's baseline network in its first level
    only; later levels start from that state at the lesion, and every level's rows still equal a
    separate run of its settings, bit for bit: in this process and through an executor, in one
    unit and in several."""
    from concurrent.futures import ThreadPoolExecutor

    from virtualpatient.phases import Train

    trained = []
    run = Train.run

    def counting(self, group, ctx):
        trained.extend(s.index for s in group.batch.specs)
        return run(self, group, ctx)

    plan = load_plan(_study(tmp_path, TINY.replace("n_patients = 1", "n_patients = 3")
                            + '[sweep]\n[sweep.fields]\n"pruning.fraction" = [0.85, 0.9, 0.95]\n'))
    for per_unit, executor in ((None, None), (2, ThreadPoolExecutor(2))):
        separate = [ClinicalTrial(lv.protocol, patients_per_unit=per_unit, progress=False).run()
                    for lv in plan.levels()]
        monkeypatch.setattr(Train, "run", counting)
        trained.clear()
        results = run_sweep(plan, None, executor=executor, patients_per_unit=per_unit, progress=False)
        monkeypatch.undo()
        assert sorted(trained) == [0, 1, 2]
        for lv, alone in zip(plan.levels(), separate, strict=True):
            rows = results[results["pruning.fraction"] == lv.values["pruning.fraction"]]
            pd.testing.assert_frame_equal(rows.drop(columns=["pruning.fraction", "cohort"]).reset_index(drop=True),
                                          alone)


def test_a_sweep_resumed_with_more_levels_and_stopped_reports_every_finished_level(swept, tmp_path):
    """Resuming a finished sweep with more levels rewrites its plan as unfinished; stopped before the
    end, its old results.csv lacks the new levels, so the report reads the finished levels (all the
    old ones) and says one is missing, instead of silently showing the old results alone. A copy of a
    finished sweep (file times changed) is still finished."""
    from analysis.report import load_run

    _, out, _ = swept
    assert json.loads((out / "levels.json").read_text())["finished"] is True
    grown = tmp_path / "grown"
    shutil.copytree(out, grown, copy_function=shutil.copy)  # no file times kept
    assert load_run(grown).partial is None
    plan = json.loads((grown / "levels.json").read_text())
    n = len(plan["levels"])
    plan["levels"].append({"name": "L000000000000", "values": {"pruning.fraction": 0.99}, "cohort": 0})
    (grown / "levels.json").write_text(json.dumps({**plan, "finished": False}))
    run = load_run(grown)
    assert run.partial == (n, n + 1)
    pd.testing.assert_frame_equal(run.results, load_run(out).results)
