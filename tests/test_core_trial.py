"""Tests of virtualpatient.trial: the whole schedule end to end on a tiny study (facts 11-16)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from virtualpatient import ClinicalTrial, PatientBatch, PatientSpec, Protocol
from virtualpatient.engine.settings import engine_options, eval_group_size
from virtualpatient.stabiliser import washout_schedule
from virtualpatient.trial import COLUMNS, SCHEDULE_COLUMNS, TrainingDivergedError, run_arm

ARMS = ("ketamine", "ssri", "neurosteroid")
COVARIATES = ("prune_fraction", "regrowth_fraction", "lr_scale")


def _rows(df: pd.DataFrame, **where) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for column, value in where.items():
        mask &= (df[column] == value).to_numpy()
    return df[mask]


def _values(df, **where) -> np.ndarray:
    return _rows(df, **where).sort_values("patient")["value"].to_numpy()


def test_results_cover_every_metric_of_tables_1_to_4(tiny_run, tiny_protocol):
    """Every arm (and the pruned baseline) has sparsity, clean/standard/combined/biased accuracy, accuracy at
    every resilience sigma, gain, activation magnitude and acute relapse: one row per patient each."""
    df, _ = tiny_run
    assert list(df.columns) == COLUMNS + list(COVARIATES) + SCHEDULE_COLUMNS
    patients = [0, 1]
    sigmas = tiny_protocol.assessment.resilience_sigmas
    for arm, phase in [("untreated", "pruned")] + [(a, "acute") for a in ARMS]:
        for metric, condition in [("sparsity", ""), ("accuracy", "clean"), ("accuracy", "standard"),
                                  ("accuracy", "combined"), ("accuracy", "biased"), ("gain", ""),
                                  ("activation_magnitude", "")]:
            rows = _rows(df, arm=arm, phase=phase, metric=metric, condition=condition)
            assert sorted(rows.patient) == patients, (arm, metric, condition)
        noise = _rows(df, arm=arm, phase=phase, condition="internal_noise")
        assert sorted(noise.noise_sigma.unique()) == sorted(sigmas)
        assert len(noise) == len(sigmas) * len(patients)
        # sigma 0 is the standard test, noise-free: the same number
        np.testing.assert_array_equal(noise[noise.noise_sigma == 0].sort_values("patient").value,
                                      _values(df, arm=arm, phase=phase, condition="standard"))
    for arm in ARMS:
        for metric, condition in [("sparsity", ""), ("accuracy", "combined"), ("relapse_drop", "")]:
            rows = _rows(df, arm=arm, phase="acute_relapse", metric=metric, condition=condition)
            assert sorted(rows.patient) == patients, (arm, metric)
    baseline = _rows(df, arm="untreated", phase="baseline")
    assert sorted(baseline.condition) == ["clean", "clean", "standard", "standard"]
    assert set(df.phase) == {"baseline", "pruned", "acute", "maintenance", "washout", "off_medication",
                             "acute_relapse"}


def test_washout_rows_and_relapse_verdict(tiny_run, tiny_protocol):
    """Per arm and duration: biased accuracy and protection at steps 0..washout_steps, protection follows
    max(0, p - rate); relapsed (0/1) only at the last step, 1 exactly when that accuracy is below 60."""
    df, _ = tiny_run
    lon = tiny_protocol.longitudinal
    steps = list(range(lon.washout_steps + 1))
    for arm in ARMS:
        levels = washout_schedule(1.0, tiny_protocol.arms[arm].washout_decay, lon.washout_steps)
        for d in lon.durations:
            w = _rows(df, arm=arm, phase="washout", maintenance_epochs=d)
            for patient in (0, 1):
                mine = w[w.patient == patient]
                biased = mine[mine.condition == "biased"].sort_values("step")
                protection = mine[mine.metric == "protection"].sort_values("step")
                relapsed = mine[mine.metric == "relapsed"]
                assert list(biased.step) == steps and list(protection.step) == steps
                np.testing.assert_allclose(protection.value, levels, atol=1e-12)
                assert list(relapsed.step) == [lon.washout_steps]
                assert relapsed.value.iloc[0] == float(biased.value.iloc[-1] < lon.relapse_threshold)
            maint = _rows(df, arm=arm, phase="maintenance", maintenance_epochs=d)
            assert sorted(maint.patient) == [0, 1] and set(maint.condition) == {"standard"}
    assert set(_rows(df, metric="relapsed").value) <= {0.0, 1.0}
    assert set(_rows(df, phase="washout").maintenance_epochs) == set(lon.durations)


def test_off_medication_only_for_the_neurosteroid_arm(tiny_run, tiny_protocol):
    """Fact 12: only the state-dependent arm is re-tested with its module off: combined, biased,
    internal noise at sigma 2.5, activation magnitude."""
    df, _ = tiny_run
    off = _rows(df, phase="off_medication")
    assert set(off.arm) == {"neurosteroid"}
    got = sorted(zip(off.metric, off.condition, off.noise_sigma.fillna(-1.0)))
    want = sorted([("accuracy", "combined", -1.0), ("accuracy", "biased", -1.0),
                   ("accuracy", "internal_noise", 2.5), ("activation_magnitude", "", -1.0)] * 2)
    assert got == want


def test_values_are_in_range_and_consistent(tiny_run, tiny_protocol):
    """Accuracies in [0, 100]; gains are each arm's; sparsities are the lesion's, 47.5-ish after regrowth;
    relapse_drop = acute combined - relapse combined; relapse sparsity ~ s + 0.4 (1 - s); covariates present."""
    df, _ = tiny_run
    acc = _rows(df, metric="accuracy").value
    assert acc.between(0, 100).all() and np.isfinite(acc).all()
    assert (_rows(df, metric="activation_magnitude").value > 0).all()
    for arm, gain in (("untreated", 1.0), ("ketamine", 1.25), ("ssri", 1.6), ("neurosteroid", 0.85)):
        assert set(_rows(df, arm=arm, metric="gain").value) == {gain}
    lesion = _values(df, arm="untreated", phase="pruned", metric="sparsity")
    assert np.all(np.abs(lesion - 95) < 1.0)
    for arm in ("ssri", "neurosteroid"):  # sparsity unchanged by these arms
        np.testing.assert_array_equal(_values(df, arm=arm, phase="acute", metric="sparsity"), lesion)
    assert np.all(np.abs(_values(df, arm="ketamine", phase="acute", metric="sparsity") - 47.5) < 1.5)
    total = sum(a * b for a, b in zip(tiny_protocol.network.layer_sizes[:-1], tiny_protocol.network.layer_sizes[1:]))
    for arm in ARMS:
        s = _values(df, arm=arm, phase="acute", metric="sparsity") / 100
        after = _values(df, arm=arm, phase="acute_relapse", metric="sparsity") / 100
        target = np.minimum(s + 0.4 * (1 - s), 0.99)
        assert np.all(np.abs(after - target) <= 4 / total + 1e-12)  # per-layer quantiles: +-1 entry per layer
        before = _values(df, arm=arm, phase="acute", condition="combined")
        stressed = _values(df, arm=arm, phase="acute_relapse", condition="combined")
        np.testing.assert_allclose(_values(df, arm=arm, phase="acute_relapse", metric="relapse_drop"),
                                   before - stressed, atol=1e-9)
    for _, rows in df.groupby("patient"):
        assert set(rows.prune_fraction) == {0.95} and set(rows.lr_scale) == {1.0}
        assert rows.regrowth_fraction.isna().all()  # the arm's own 0.5 applies


def test_run_folder(tiny_run, tiny_protocol):
    """run(out=...) writes results.csv (the returned table), protocol.json (same hash) and manifest.json
    with protocol_hash, versions and commit."""
    df, out = tiny_run
    assert {"results.csv", "protocol.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"protocol_hash", "versions", "commit"} <= set(manifest)
    assert manifest["protocol_hash"] == tiny_protocol.hash()
    assert {"torch", "numpy", "virtualpatient"} <= set(manifest["versions"])
    stored = Protocol.from_dict(json.loads((out / "protocol.json").read_text()))
    assert stored.hash() == tiny_protocol.hash()
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    np.testing.assert_allclose(csv.value.to_numpy(), df.value.to_numpy(), rtol=1e-12, atol=0)
    assert (csv.arm.to_numpy() == df.arm.to_numpy()).all()


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_run, make_protocol):
    """Re-running the same study gives an identical table; another study seed gives other numbers."""
    df, _ = tiny_run
    again = ClinicalTrial(make_protocol(), progress=False).run()
    pd.testing.assert_frame_equal(df, again, check_exact=True)
    other = ClinicalTrial(make_protocol(seed=4), progress=False).run()
    assert other.shape == df.shape
    pd.testing.assert_frame_equal(df.drop(columns="value"), other.drop(columns="value"))
    moving = ~df.metric.isin(["gain", "protection", "sparsity"])
    changed = (df.value[moving].to_numpy() != other.value[moving].to_numpy()).mean()
    assert changed > 0.5
    assert not np.array_equal(_values(df, arm="untreated", phase="pruned", metric="activation_magnitude"),
                              _values(other, arm="untreated", phase="pruned", metric="activation_magnitude"))


def test_nested_maintenance_equals_separate_runs(make_protocol, monkeypatch):
    """longitudinal.nested = True (snapshots of one run) and False (one run per duration) give identical rows.

    Maintenance runs at Adam 1e-2 here so that the durations end in visibly different states (at 1e-6 a
    mix-up of snapshots would go unnoticed). A spy on PatientBatch.train confirms the two paths differ: one
    maintenance run per arm with snapshots at every duration, versus one run per arm and duration.
    """
    calls = []
    real_train = PatientBatch.train

    def train(self, epochs, lr, stream, **kwargs):
        if stream.endswith("/maintenance"):
            calls.append((stream, epochs, tuple(kwargs.get("snapshots", ()))))
        return real_train(self, epochs, lr, stream, **kwargs)

    monkeypatch.setattr(PatientBatch, "train", train)
    nested = ClinicalTrial(make_protocol(longitudinal={"lr": 1e-2}), progress=False).run()
    assert sorted(calls) == sorted((f"{arm}/maintenance", 3, (0, 1, 3)) for arm in ARMS)
    calls.clear()
    separate = ClinicalTrial(make_protocol(longitudinal={"lr": 1e-2, "nested": False}), progress=False).run()
    assert sorted(calls) == sorted((f"{arm}/maintenance", d, ()) for arm in ARMS for d in (0, 1, 3))
    by_duration = _rows(nested, phase="washout", condition="biased").pivot_table(
        index=["arm", "patient", "step"], columns="maintenance_epochs", values="value")
    assert (by_duration[0.0] != by_duration[3.0]).any() and (by_duration[1.0] != by_duration[3.0]).any()
    pd.testing.assert_frame_equal(nested, separate, check_exact=False, rtol=1e-7, atol=1e-9)
    for phase in ("maintenance", "washout"):  # the point of the test, spelled out
        pd.testing.assert_frame_equal(_rows(nested, phase=phase), _rows(separate, phase=phase),
                                      check_exact=False, rtol=1e-7, atol=1e-9)


def test_results_do_not_depend_on_batching(tiny_run, make_protocol):
    """Each patient in its own unit (patients_per_unit = 1) gives the table of the batched run."""
    df, _ = tiny_run
    alone = ClinicalTrial(make_protocol(), progress=False, patients_per_unit=1).run()
    pd.testing.assert_frame_equal(df, alone, check_exact=False, rtol=1e-7, atol=1e-9)


def test_evaluation_groups_change_no_number(tiny_run, make_protocol):
    """Evaluating one network at a time (a one-byte eval_max_bytes) gives the table of evaluating
    each unit, and the wash-out's durations x patients networks, as one batch: each network keeps
    its data, its snapshot and its own noise stream whatever its group."""
    df, _ = tiny_run
    protocol = make_protocol()
    assert eval_group_size(protocol.task.n_standard, protocol.network.layer_sizes) >= 6  # one group by default
    with engine_options(eval_max_bytes=1):
        assert eval_group_size(protocol.task.n_standard, protocol.network.layer_sizes) == 1
        grouped = ClinicalTrial(protocol, progress=False).run()
    pd.testing.assert_frame_equal(df, grouped, check_exact=False, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("where", "names"),
    [
        (("baseline",), ["patient(s) [0, 1]", "untreated", "baseline training", "epoch 1"]),
        (("arms", "ssri"), ["patient(s) [0, 1]", "arm ssri", "acute course", "epoch 1"]),
        (("longitudinal",), ["patient(s) [0, 1]", "arm ketamine", "maintenance", "epoch 1"]),
    ],
    ids=["baseline", "acute", "maintenance"],
)
def test_divergence_raises_training_diverged_error(make_protocol, where, names):
    """A run whose training blows up (lr = 1e30) stops with TrainingDivergedError naming patients, phase, epoch.

    A study cannot set lr = 1e30 (learning rates are bounded at load), so the test writes it into
    the validated protocol's frozen section directly: the divergence guard must hold whatever the
    source of the blow-up.
    """
    protocol = make_protocol(arms={"ssri": {"epochs": 3}}) if where[0] == "arms" else make_protocol()
    section = protocol.arms[where[1]] if where[0] == "arms" else getattr(protocol, where[0])
    object.__setattr__(section, "lr", 1e30)
    with pytest.raises(TrainingDivergedError) as info:
        ClinicalTrial(protocol, progress=False).run()
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_divergence_names_the_patient_not_its_batch_position(tiny_protocol):
    """Only the patient whose learning rate explodes is named, by its cohort index."""
    specs = [PatientSpec(0, tiny_protocol.seed), PatientSpec(5, tiny_protocol.seed, {"lr_scale": 1e30})]
    pruned = PatientBatch(specs, tiny_protocol)
    pruned.prune()
    with pytest.raises(TrainingDivergedError) as info:
        run_arm(tiny_protocol, "ketamine", pruned)
    message = str(info.value)
    assert "patient(s) [5]" in message and "arm ketamine" in message and "epoch 1" in message


def test_trial_checks_its_arguments(tiny_protocol):
    """ClinicalTrial refuses a non-Protocol and a non-positive unit size; the cohort has n_patients specs."""
    with pytest.raises(TypeError):
        ClinicalTrial({"n_patients": 2})
    with pytest.raises(ValueError):
        ClinicalTrial(tiny_protocol, patients_per_unit=0)
    trial = ClinicalTrial(tiny_protocol, progress=False)
    assert [s.index for s in trial.cohort] == [0, 1]
    assert trial.epochs_per_patient() == {"baseline": 4, "ketamine": 1 + 3, "ssri": 3 + 3, "neurosteroid": 2 + 3}
    assert not math.isnan(trial.cohort[0].covariates["prune_fraction"])


def test_baseline_divergence_on_its_only_step_is_reported(make_protocol):
    """A baseline that diverges on its single optimiser step (1 epoch x 1 mini-batch, lr 1e30) raises
    TrainingDivergedError naming the baseline, instead of a results table from a NaN network."""
    protocol = make_protocol(
        baseline={"epochs": 1}, task={"n_train": 128}, longitudinal={"durations": (0,)},
        arms={"ketamine": {"epochs": 0}, "ssri": {"epochs": 0}, "neurosteroid": {"epochs": 0}},
    )
    object.__setattr__(protocol.baseline, "lr", 1e30)  # beyond what a study may set (see above)
    with pytest.raises(TrainingDivergedError, match="baseline training"):
        ClinicalTrial(protocol, progress=False).run()


def test_acute_relapse_prunes_only_what_the_lesion_pruned(make_protocol):
    """Under the text's reading (pruning.layers = "hidden") the acute-relapse stressor re-prunes the
    three hidden matrices to s + 0.4 (1 - s), s their own sparsity, and leaves the output layer whole."""
    from virtualpatient.phases import Context, Group, Stress

    protocol = make_protocol(pruning={"fraction": 0.9, "layers": "hidden"})
    batch = PatientBatch([PatientSpec(i, protocol.seed) for i in (0, 1)], protocol)
    batch.prune()
    assert batch.lesion_layers == [0, 1, 2]
    group = Group.start(batch.clone())
    stress = Stress(further=protocol.relapse.further_fraction, cap=protocol.relapse.max_sparsity)
    stress.run(group, Context(protocol, "ketamine"))
    stressed = group.batch.params
    assert torch.all(stressed.masks[3] == 1)
    s = batch.params.sparsity([0, 1, 2]).numpy() / 100
    np.testing.assert_allclose(stressed.sparsity([0, 1, 2]).numpy() / 100, s + 0.4 * (1 - s), atol=0.01)
