"""Per-patient modulation state, state covariates, and the scripted VirtualPatient.

Everything random comes from the tiny study's seed (per-patient streams) or an explicitly seeded
generator. "Alone" means a batch of one patient with that patient's values as plain floats.
Batched training equals training alone up to float rounding of batched products (the tolerance
of ``test_core_network``: 1e-5 absolute on weights); evaluation of given weights is bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from virtualpatient import PatientBatch, PatientSpec, Protocol, VirtualPatient
from virtualpatient.assessments import ACUTE, assess
from virtualpatient.assessments import biased as biased_test
from virtualpatient.cohort import COVARIATES, Cohort, CohortConfig, Distribution
from virtualpatient.engine import ops
from virtualpatient.engine.batched import forward
from virtualpatient.network import BiasedNoise, Modulation
from virtualpatient.patient import HISTORY_COLUMNS, RESULT_COLUMNS
from virtualpatient.treatments import KetamineLike
from virtualpatient.trial import COLUMNS

#: Two patients in different states: every per-patient field differs.
MIXED = Modulation(gain=[1.1, 1.45], damping=[1.0, 0.8], protection=[0.0, 0.6])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Two tiny patients after baseline training and the lesion (shared; tests clone it)."""
    from tests.conftest import make_tiny_protocol

    protocol = make_tiny_protocol()
    batch = PatientBatch([PatientSpec(i, protocol.seed) for i in (0, 1)], protocol)
    batch.train_baseline()
    batch.prune()
    return batch


def _alone(batch: PatientBatch, pos: int, mod: Modulation) -> PatientBatch:
    one = batch.select([pos])
    one.modulation = mod.patient(pos)
    return one


def _assert_params_close(a, b, pos: int, atol: float) -> None:
    for x, y in zip(a.weights + a.biases, b.weights + b.biases):
        torch.testing.assert_close(x[0], y[pos], atol=atol, rtol=0)


# -- the engine ----------------------------------------------------------------------------------
def test_different_states_in_one_batch_evaluate_as_each_patient_alone(pruned):
    """Logits and accuracies (clean, internal noise, biased noise) of a batch whose patients have
    different gain, damping and protection equal each patient evaluated alone, bit for bit."""
    batch = pruned.clone()
    batch.modulation = MIXED
    stab = batch.protocol.stabiliser
    both = forward(batch.params, batch.data.standard_x, MIXED, stab)
    noisy = batch.accuracy("standard", mod=MIXED.replace(noise_sigma=0.7), noise_stream="t")
    biased = batch.accuracy("standard", noise_stream="b", biased=BiasedNoise())
    for pos in (0, 1):
        one = _alone(batch, pos, MIXED)
        assert isinstance(one.modulation.gain, float)
        alone = forward(one.params, one.data.standard_x, one.modulation, stab)
        assert torch.equal(alone[0], both[pos])
        assert one.accuracy("standard", mod=one.modulation.replace(noise_sigma=0.7), noise_stream="t")[0] == noisy[pos]
        assert one.accuracy("standard", noise_stream="b", biased=BiasedNoise())[0] == biased[pos]
    # the states really differ: patient 1 with patient 0's state computes other logits
    other = forward(batch.params, batch.data.standard_x, MIXED.take([0, 0]), stab)
    assert not torch.equal(other[1], both[1])


@pytest.mark.parametrize("mod", [MIXED, Modulation(gain=[1.2, 1.5], noise_sigma=[0.0, 0.3], activation="tanh")],
                         ids=["gain-damping-protection", "gain-noise-tanh"])
def test_different_states_in_one_batch_train_as_each_patient_alone(pruned, mod):
    """Two patients trained together in different states (gains, damping, protection; or internal
    noise for one of them only) end where each ends trained alone, within 1e-5 (batched rounding),
    and their weights differ from training both in patient 0's state."""
    batch = pruned.clone()
    batch.modulation = mod
    batch.train(2, 1e-2, "state-test")
    for pos in (0, 1):
        one = _alone(pruned, pos, mod)
        one.train(2, 1e-2, "state-test")
        _assert_params_close(one.params, batch.params, pos, atol=1e-5)
    same = pruned.clone()
    same.modulation = mod.take([0, 0])
    same.train(2, 1e-2, "state-test")
    assert not torch.allclose(same.params.weights[1][1], batch.params.weights[1][1], atol=1e-5)


def test_uniform_per_patient_values_are_the_scalar_path_bit_for_bit(pruned):
    """A per-patient value that is the same for everyone is stored as the float and trains bit for
    bit as the float does; the per-slice kernel calls with equal values equal one shared call."""
    assert Modulation(gain=[1.3, 1.3], protection=torch.tensor([0.5, 0.5], dtype=torch.float64)) == \
        Modulation(gain=1.3, protection=0.5)
    listed, scalar = pruned.clone(), pruned.clone()
    listed.modulation = listed.modulation.replace(gain=[1.3, 1.3], damping=(0.9, 0.9))
    scalar.modulation = scalar.modulation.replace(gain=1.3, damping=0.9)
    listed.train(1, 1e-2, "uniform")
    scalar.train(1, 1e-2, "uniform")
    for a, b in zip(listed.params.weights + listed.params.biases, scalar.params.weights + scalar.params.biases):
        assert torch.equal(a, b)
    # the per-patient branches of the fused steps, forced with a tuple of equal values
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 5, 7, generator=gen)
    draw = torch.randn(3, 7, 5, generator=gen)
    for kind in ("native", "torch"):
        for act in ("relu", "tanh"):
            h1, d1 = ops.post_activation(z.clone(), act, 0.7, 0.1, kind=kind)
            h2, d2 = ops.post_activation(z.clone(), act, (0.7,) * 3, (0.1,) * 3, kind=kind)
            assert torch.equal(h1, h2) and torch.equal(d1, d2)
            g1 = ops.pre_activation_grad(h1.clone(), d1, 0.7, kind=kind)
            g2 = ops.pre_activation_grad(h1.clone(), d1, (0.7,) * 3, kind=kind)
            assert torch.equal(g1, g2)
        n1 = ops.add_noise_t(z.clone(), draw.clone(), 0.3, 0.2, 0.7, 0.1, kind=kind)
        n2 = ops.add_noise_t(z.clone(), draw.clone(), (0.3,) * 3, 0.2, (0.7,) * 3, 0.1, kind=kind)
        assert torch.equal(n1, n2)


def test_protection_per_patient_affects_only_that_patient(pruned):
    """Wash-out style: a biased-noise test with protection [0, 0.8] gives patient 0 exactly its
    unprotected result and patient 1 exactly its result at p = 0.8, which differs from p = 0."""
    stab = pruned.protocol.stabiliser
    x = pruned.data.standard_x
    mixed = forward(pruned.params, x, Modulation(protection=[0.0, 0.8]), stab)
    off = forward(pruned.params, x, Modulation(), stab)
    on = forward(pruned.params, x, Modulation(protection=0.8), stab)
    assert torch.equal(mixed[0], off[0]) and torch.equal(mixed[1], on[1])
    assert not torch.equal(mixed[1], off[1])
    rows = biased_test(pruned.with_modulation(Modulation(protection=[0.0, 0.8])), pruned.noise("washout"))
    plain = biased_test(pruned.with_modulation(Modulation()), pruned.noise("washout"))
    assert rows[0]["value"] == plain[0]["value"]


def test_modulation_validation():
    """Bad per-patient values are refused: wrong types, lengths, ranges and batch sizes."""
    with pytest.raises(TypeError):
        Modulation(gain="1.2")
    with pytest.raises(TypeError):
        Modulation(gain=[1.0, None])
    with pytest.raises(ValueError, match="one length"):
        Modulation(gain=[1.0, 1.2], protection=[0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="protection"):
        Modulation(protection=[0.5, 1.5])
    with pytest.raises(ValueError, match="noise_sigma"):
        Modulation(noise_sigma=[0.0, -0.1])
    with pytest.raises(ValueError, match="finite"):
        Modulation(gain=[1.0, math.nan])
    with pytest.raises(ValueError, match="shape"):
        Modulation(gain=torch.ones(2, 2))


def test_per_patient_state_is_carried_by_select_stack_clone_and_state_dict(pruned, tmp_path):
    """select / stack / clone / state_dict -> torch.save -> weights_only load -> from_state_dict all
    keep each patient's own values, and the rebuilt batch computes the same logits."""
    batch = pruned.clone()
    batch.modulation = MIXED
    with pytest.raises(ValueError, match="3 patients"):
        batch.modulation = Modulation(gain=[1.0, 1.1, 1.2])
    with pytest.raises(TypeError):
        batch.modulation = {"gain": 1.0}
    assert batch.select([1]).modulation == MIXED.patient(1)
    assert batch.select([1, 0]).modulation.gain == (1.45, 1.1)
    assert batch.clone().modulation == MIXED
    assert PatientBatch.stack([batch.select([0]), batch.select([1])]).modulation == MIXED
    path = tmp_path / "batch.pt"
    torch.save(batch.state_dict(), path)
    again = PatientBatch.from_state_dict(torch.load(path, weights_only=True), batch.protocol)
    assert again.modulation == MIXED
    stab = batch.protocol.stabiliser
    assert torch.equal(forward(again.params, again.data.standard_x, again.modulation, stab),
                       forward(batch.params, batch.data.standard_x, batch.modulation, stab))


# -- state covariates ----------------------------------------------------------------------------
def test_state_covariates_set_each_patients_gain_and_protection(pruned):
    """gain_sensitivity s makes the gain 1 + s (gain - 1) and protection_scale c makes the protection
    c p for that patient only: a batch with the covariates trains and tests exactly as one given
    those per-patient values directly; patients without them keep the arm's values."""
    covs = [{"gain_sensitivity": 0.5, "protection_scale": 0.25}, {}]
    specs = [PatientSpec(s.index, s.study_seed, c) for s, c in zip(pruned.specs, covs)]
    with_covs = PatientBatch(specs, pruned.protocol, pruned.params.clone())
    direct = pruned.clone()
    with_covs.modulation = Modulation(gain=1.6, protection=0.8)
    direct.modulation = Modulation(gain=[1.3, 1.6], protection=[0.2, 0.8])
    assert with_covs.effective_modulation() == direct.modulation
    assert [r["value"] for r in assess(with_covs, ["gain"], "g")] == [1.3, 1.6]
    with_covs.train(1, 1e-2, "cov")
    direct.train(1, 1e-2, "cov")
    assert all(torch.equal(a, b) for a, b in zip(with_covs.params.weights, direct.params.weights))
    b1 = with_covs.accuracy("standard", noise_stream="b", biased=BiasedNoise())
    b2 = direct.accuracy("standard", noise_stream="b", biased=BiasedNoise())
    assert torch.equal(b1, b2)
    # baseline and discontinued states (gain 1, no protection) are untouched by the covariates
    assert with_covs.effective_modulation(Modulation()) == Modulation()


def test_state_covariates_come_from_the_cohort_and_are_recorded_only_when_set():
    """The cohort draws gain_sensitivity / protection_scale per patient in range when configured;
    unset, the specs hold only the results covariates (as before); out-of-range values are refused."""
    config = CohortConfig(gain_sensitivity=Distribution(kind="uniform", low=0.5, high=1.5), protection_scale=0.5)
    cohort = Cohort.from_config(config, n_patients=4, seed=3)
    sens = [s.covariates["gain_sensitivity"] for s in cohort]
    assert all(0.5 <= v <= 1.5 for v in sens) and len(set(sens)) == 4
    assert {s.covariates["protection_scale"] for s in cohort} == {0.5}
    plain = Cohort.from_config(CohortConfig(), n_patients=2, seed=3)
    assert all(set(s.covariates) == set(COVARIATES) for s in plain)
    with pytest.raises(ValueError, match="must lie in"):
        CohortConfig(protection_scale=1.5)


def test_unset_state_covariates_leave_the_resolved_protocol_and_its_hash_alone():
    """A protocol that sets no state covariate resolves to the cohort table it had before they
    existed (so its hash, and resuming old run folders, are unchanged); one that sets them keeps
    them through to_dict -> from_dict and hashes differently."""
    plain = Protocol()
    assert list(plain.to_dict()["cohort"]) == list(COVARIATES)
    varied = Protocol.from_dict({"cohort": {"gain_sensitivity": 0.5}})
    assert varied.to_dict()["cohort"]["gain_sensitivity"] == 0.5
    assert Protocol.from_dict(varied.to_dict()).hash() == varied.hash() != plain.hash()


# -- VirtualPatient ------------------------------------------------------------------------------
def test_scripted_patient_equals_the_same_patient_in_a_batch_of_three(tiny_protocol):
    """train -> lesion -> treat ketamine -> assess on VirtualPatient(1) gives the rows and weights
    of patient 1 inside a PatientBatch of 3 run the trial's way (same streams): weights within 1e-5
    (batched rounding), every assessment value within 1e-6."""
    patient = VirtualPatient(1, tiny_protocol)
    patient.train_baseline()
    patient.lesion()
    patient.treat("ketamine")
    got = patient.assess(ACUTE)
    batch = PatientBatch([PatientSpec(i, tiny_protocol.seed) for i in range(3)], tiny_protocol)
    batch.train_baseline()
    batch.prune()
    tiny_protocol.arms["ketamine"].apply(batch, "ketamine")
    want = [r for r in assess(batch, ACUTE, "ketamine/assess") if r["patient"] == 1]
    assert len(got) == len(want) > 10
    for (_, row), ref in zip(got.iterrows(), want):
        assert (row.metric, row.condition) == (ref["metric"], ref["condition"])
        assert row.value == pytest.approx(ref["value"], rel=1e-6, abs=1e-6), (row.metric, row.condition)
    _assert_params_close(patient.params, batch.params, 1, atol=1e-5)


def test_history_records_every_action_in_the_trials_columns(tiny_protocol):
    """Each action appends rows with the next action number; the history's columns are the trial's
    results columns, its covariates, then action and event; state is plain numbers."""
    assert RESULT_COLUMNS == COLUMNS
    patient = VirtualPatient(0, tiny_protocol, covariates={"gain_sensitivity": 2.0})
    patient.train_baseline()
    patient.assess(["standard"])
    patient.lesion(0.9)
    patient.treat(KetamineLike(epochs=1, score_batches=2), arm="ket2")
    patient.modulate(protection=0.5)
    patient.assess(["sparsity", "biased"])
    h = patient.history
    assert list(h.columns) == HISTORY_COLUMNS
    assert h.groupby("action").event.first().tolist() == ["train_baseline", "assess", "lesion", "treat", "modulate",
                                                          "assess"]
    assert h.phase.tolist()[-2:] == ["acute", "acute"] and set(h.arm[h.action >= 3]) == {"ket2"}
    assert h.query("metric == 'sparsity' and event == 'lesion'").value.item() == pytest.approx(90.0, abs=0.5)
    state = patient.state
    assert state["gain"] == 1.5 and state["protection"] == 0.5  # 1 + 2 (1.25 - 1)
    assert all(isinstance(v, float) for k, v in state.items() if k != "activation")
    assert h.query("event == 'treat' and metric == 'gain'").value.item() == 1.5
    assert [tuple(w.shape) for w in patient.weights] == [tuple(m.shape) for m in patient.masks]


def test_save_load_round_trip_and_refusals(tiny_protocol, make_protocol, tmp_path):
    """save -> load (no protocol needed) restores weights, masks, state and history exactly; a file
    of another architecture or a non-patient file is refused with a clear ValueError."""
    patient = VirtualPatient(2, tiny_protocol, covariates={"protection_scale": 0.5})
    patient.train_baseline()
    patient.lesion()
    patient.modulate(gain=[1.2], protection=1.0)
    path = tmp_path / "p.pt"
    patient.save(path)
    again = VirtualPatient.load(path)
    assert again.spec == patient.spec and again.state == patient.state
    assert all(torch.equal(a, b) for a, b in zip(again.weights + again.masks, patient.weights + patient.masks))
    assert again.history.equals(patient.history)
    again.assess(["clean"])
    assert again.history.action.max() == patient.history.action.max() + 1
    other = make_protocol(network={"layer_sizes": (2, 16, 16, 8, 4)})
    with pytest.raises(ValueError, match="architecture is 2-16-16-8-4"):
        VirtualPatient.load(path, other)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": [1, 2]}, bad)
    with pytest.raises(ValueError, match="not a patient state"):
        VirtualPatient.load(bad)
    bad.write_text("not a torch file")
    with pytest.raises(ValueError, match="not a saved patient"):
        VirtualPatient.load(bad)


def test_virtual_patient_bad_input(tiny_protocol):
    """Wrong index, covariate, protocol, fraction and treatment types or values are refused."""
    with pytest.raises(TypeError):
        VirtualPatient(1.5, tiny_protocol)
    with pytest.raises(TypeError):
        VirtualPatient(0, {"seed": 1})
    with pytest.raises(ValueError, match="unknown covariate"):
        VirtualPatient(0, tiny_protocol, covariates={"gain_scale": 1.0})
    with pytest.raises(ValueError, match="must lie in"):
        VirtualPatient(0, tiny_protocol, covariates={"protection_scale": 2.0})
    patient = VirtualPatient(0, tiny_protocol)
    with pytest.raises(ValueError):
        patient.lesion(1.0)
    with pytest.raises(TypeError):
        patient.treat(42)
    with pytest.raises(ValueError, match="unknown treatment"):
        patient.treat("placebo_x")
